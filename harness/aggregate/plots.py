"""The TFMQ paper's signature plot: temporal-feature error per timestep, one line per method.

One panel per (model, bit-width); seeds of a method are averaged point-wise. The x axis runs
from the first sampling step (largest t) to the last, as the sampler visits them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from harness.aggregate.frame import FP_METHOD
from harness.aggregate.table import METHOD_LABELS, sort_key
from harness.store import RunRecord

CURVE = "temporal_feature_error"


def curve_series(records: Sequence[RunRecord], curve: str = CURVE) -> dict[tuple[str, str], dict[str, tuple]]:
    """{(model, bits): {method label: (timesteps, mean error)}} over finished, non-variant runs."""
    runs: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        steps, values = r.curves.get("timesteps"), r.curves.get(curve)
        ok = r.finished and not r.variant and r.method != FP_METHOD and steps and values
        if ok and len(steps) == len(values):
            runs.setdefault((r.model, r.bits, r.method), []).append(r)
    series: dict[tuple[str, str], dict[str, tuple]] = {}
    order = sorted(runs, key=lambda k: (k[0], sort_key("bits", k[1]), sort_key("method", k[2])))
    for model, bits, method in order:
        group = runs[(model, bits, method)]
        steps = list(group[0].curves["timesteps"])
        same = [g for g in group if list(g.curves["timesteps"]) == steps]
        mean = np.mean([np.asarray(g.curves[curve], dtype=float) for g in same], axis=0)
        series.setdefault((model, bits), {})[METHOD_LABELS.get(method, method)] = (steps, mean)
    return series


def plot_temporal_error(records: Sequence[RunRecord], path: Path, curve: str = CURVE) -> Path | None:
    """Write the PNG; None when no record carries the curve."""
    series = curve_series(records, curve)
    if not series:
        return None
    # a bare Figure (no pyplot): no global backend state, safe in any process
    fig = Figure(figsize=(4.2 * len(series), 3.2))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, ((model, bits), lines) in zip(axes[0], series.items(), strict=True):
        for label, (steps, mean) in lines.items():
            ax.plot(steps, mean, marker=".", label=label)
        if min(float(m.min()) for _, m in lines.values()) > 0:
            ax.set_yscale("log")
        ax.invert_xaxis()  # sampling runs from large t to small t
        ax.set(title=f"{model} {bits}", xlabel="timestep t", ylabel=curve.replace("_", " "))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
