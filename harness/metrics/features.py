"""Feature extractors: images -> pooled, spatial and logit features in one pass.

Input convention: every extractor takes float images (N, C, H, W) in [-1, 1], the range diffusion
models output. They are first snapped to the 8-bit grid (what saving a PNG does), so generated and
real images are compared on the same footing, whatever the extractor does next.

One pass gives the three views the metrics need: `pooled` (FID, KID), `spatial` (sFID) and
`logits` (IS, class accuracy). Extractors are registered by name (`lenet`, `inception`) in
`EXTRACTORS`; `build_extractor(name, **options)` makes one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.finite import check_finite
from harness.progress import progress_bar
from harness.registry import Registry

FEATURE_KEYS = ("pooled", "spatial", "logits")


@dataclass
class Features:
    """Features of N images, float32 on the CPU, one row per image."""

    pooled: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor

    def __post_init__(self) -> None:
        n = {k: getattr(self, k).shape[0] for k in FEATURE_KEYS}
        if len(set(n.values())) != 1:
            raise ValueError(f"feature views disagree on the number of images: {n}")

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def __getitem__(self, rows: torch.Tensor | slice) -> Features:
        return Features(*(getattr(self, k)[rows] for k in FEATURE_KEYS))

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        if not parts:
            raise ValueError("no feature batches to concatenate")
        return Features(*(torch.cat([getattr(p, k) for p in parts]) for k in FEATURE_KEYS))

    def tensors(self) -> dict[str, torch.Tensor]:
        """For the artifact cache (safetensors)."""
        return {k: getattr(self, k).contiguous() for k in FEATURE_KEYS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Features:
        missing = [k for k in FEATURE_KEYS if k not in tensors]
        if missing:
            raise KeyError(f"feature tensors lack {missing}; expected keys {list(FEATURE_KEYS)}")
        return cls(*(tensors[k] for k in FEATURE_KEYS))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 0..255 (rounded, clipped), as an image file would hold them."""
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [-1, 1], got dtype {images.dtype}")
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class FeatureExtractor(ABC):
    """A frozen network mapping images in [-1, 1] to `Features`."""

    name: str
    device: torch.device

    @abstractmethod
    def extract_batch(self, images: torch.Tensor) -> Features:
        """Features of one batch of images (N, C, H, W) in [-1, 1]; returned on the CPU."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Everything the features depend on (name, weights digest, preprocessing): a cache key."""


def images_to_features(
    extractor: FeatureExtractor,
    images: torch.Tensor,
    batch_size: int = 250,
    progress: bool = True,
    desc: str | None = None,
) -> Features:
    """Features of all `images` (N, C, H, W) in [-1, 1], batched, with a progress bar."""
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"<batch_size={batch_size}> must be a positive integer")
    parts = []
    starts = range(0, len(images), batch_size)
    for s in progress_bar(starts, desc=desc or f"{extractor.name} features", disable=not progress, leave=False):
        with torch.no_grad():
            parts.append(extractor.extract_batch(images[s : s + batch_size].to(extractor.device)))
        for key, t in parts[-1].tensors().items():  # a NaN feature would become a plausible FID
            check_finite(t, f"{extractor.name} features ({key}) of images {s}..{s + len(t) - 1}")
    return Features.cat(parts)


EXTRACTORS: Registry[Callable[..., FeatureExtractor]] = Registry("feature extractor")


def build_extractor(name: str, **options: Any) -> FeatureExtractor:
    """The extractor registered as `name` (lenet, inception), built with its options."""
    return EXTRACTORS.get(name)(**options)


# The built-in extractors register themselves when imported (EXTRACTORS exists by now).
from harness.metrics import inception, lenet  # noqa: E402, F401  isort: skip
