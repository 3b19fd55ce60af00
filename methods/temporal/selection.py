"""Disturbance-aware selection: per temporal feature, keep the path that is closer to FP.

The TIB-based path carries the TIB's weight and activation quantization error (reduced by TIAR and
FSC); the cache-based path carries only the rounding of the stored feature to the activation grid.
Which is smaller differs per feature (a wide-range projection quantizes badly as a cached output,
a narrow one well), so each feature is measured against FP over every (timestep, label) of the
sampler and the better path is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from methods.temporal.cache import TemporalFeatureCache
from methods.temporal.tib import TIB, iter_schedule

Path = Literal["tib", "cache"]


@dataclass(frozen=True)
class Choice:
    """The selection for one temporal feature and the errors it was based on (MSE vs FP)."""

    feature: str
    path: Path
    tib_error: float
    cache_error: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def path_errors(q_net: nn.Module, fp_net: nn.Module, tib: TIB, caches: dict[str, TemporalFeatureCache],
                schedule: list[int], labels: list[int]) -> dict[str, tuple[float, float]]:
    """{feature: (TIB-path MSE, cache-path MSE)} against FP over every (timestep, label) of the sampler.

    The TIB path is the quantized network's own TIB (its rounding and, per timestep if FSC ran,
    its activation quantizers); the cache path is what the cache serves.
    """
    sums = {name: [0.0, 0.0] for name in caches}
    fp_rows = iter_schedule(fp_net, tib, schedule, labels)
    for (ts, q), (_, f) in zip(iter_schedule(q_net, tib, schedule, labels), fp_rows, strict=True):
        for name, cache in caches.items():
            ref = f[name].float()
            sums[name][0] += float((q[name].float() - ref).pow(2).mean())
            sums[name][1] += float((cache.values_at(ts).to(ref.device) - ref).pow(2).mean())
    return {name: (v[0] / len(schedule), v[1] / len(schedule)) for name, v in sums.items()}


def select_paths(errors: dict[str, tuple[float, float]]) -> list[Choice]:
    """Per feature the path with the smaller error; a tie goes to the cache, which also saves compute."""
    return [Choice(name, "cache" if e_cache <= e_tib else "tib", e_tib, e_cache)
            for name, (e_tib, e_cache) in errors.items()]
