"""Figures from the store: the TFMQ paper's temporal-feature error per timestep, FID vs bit-width,
and bar charts (calibration time, latency). Colours, grid and formats come from style.py.

Every figure is a grid of panels that wraps after three columns, with the legend outside the data,
written as PNG and PDF side by side. Seeds of a method are drawn as their mean with a min-max band
(the axis label says so); a single seed has no band. The TFE x axis runs from the first sampling
step (largest t) to the last, as the sampler visits them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from harness.aggregate.frame import FP_METHOD
from harness.aggregate.metric_info import metric_info, with_extractor
from harness.aggregate.style import BAND_ALPHA, DPI, FORMATS, PANEL_SIZE, grid_shape, method_color
from harness.aggregate.table import METHOD_LABELS, sort_key, table_extractor
from harness.store import RunRecord

CURVE = "temporal_feature_error"
HATCHES = ("", "//", "..", "xx", "\\\\")  # bars of one method at different bit-widths


@dataclass(frozen=True)
class SeedCurve:
    """One method's curve over its seeds: point-wise mean and min-max band."""

    steps: list[int]
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: int


def curve_series(records: Sequence[RunRecord], curve: str = CURVE) -> dict[tuple[str, str], dict[str, SeedCurve]]:
    """{(model, bits): {method key: SeedCurve}} over finished, non-variant quantized runs."""
    runs: dict[tuple[str, str, str], list[RunRecord]] = {}
    for r in records:
        steps, values = r.curves.get("timesteps"), r.curves.get(curve)
        ok = r.finished and not r.variant and r.method != FP_METHOD and steps and values
        if ok and len(steps) == len(values):
            runs.setdefault((r.model, r.bits, r.method), []).append(r)
    series: dict[tuple[str, str], dict[str, SeedCurve]] = {}
    order = sorted(runs, key=lambda k: (k[0], sort_key("bits", k[1]), sort_key("method", k[2])))
    for model, bits, method in order:
        group = runs[(model, bits, method)]
        steps = list(group[0].curves["timesteps"])
        values = np.array([g.curves[curve] for g in group if list(g.curves["timesteps"]) == steps], dtype=float)
        series.setdefault((model, bits), {})[method] = SeedCurve(steps, values.mean(0), values.min(0),
                                                                 values.max(0), len(values))
    return series


def _figure(panels: int) -> tuple[Figure, list]:
    """A bare Figure (no pyplot: no global backend state, safe in any process) with a wrapping grid;
    panels past `panels` are hidden."""
    rows, cols = grid_shape(panels)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols + 1.6, PANEL_SIZE[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _legend(fig: Figure, handles: dict[str, object], title: str = "") -> None:
    """One legend for the whole figure, right of the panels (never over the data); its title says what
    the bands or bars mean."""
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False,
               title=title or None, title_fontsize=7, alignment="left")


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as every format in FORMATS beside `path` (its suffix replaced); returns the PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for fmt in FORMATS:
        # no creation date: regenerating committed figures from the same records changes no byte
        metadata = {"CreationDate": None} if fmt == "pdf" else {}
        fig.savefig(path.with_suffix(f".{fmt}"), dpi=DPI, metadata=metadata)
    return path.with_suffix(".png")


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def plot_temporal_error(records: Sequence[RunRecord], path: Path, curve: str = CURVE) -> Path | None:
    """Write the TFE figure (PNG + PDF); None when no record carries the curve."""
    series = curve_series(records, curve)
    if not series:
        return None
    fig, axes = _figure(len(series))
    handles: dict[str, object] = {}
    for ax, ((model, bits), lines) in zip(axes, series.items(), strict=True):
        for method, c in lines.items():
            color = method_color(method)
            (line,) = ax.plot(c.steps, c.mean, marker=".", markersize=3, color=color)
            if c.n > 1:
                ax.fill_between(c.steps, c.lo, c.hi, color=color, alpha=BAND_ALPHA, linewidth=0)
            handles.setdefault(_label(method), line)
        if min(float(c.lo.min()) for c in lines.values()) > 0:
            ax.set_yscale("log")
        ax.invert_xaxis()  # sampling runs from large t to small t
        ax.set(title=f"{model} {bits}", xlabel="timestep t", ylabel="temporal-feature error")
    seeds = max(c.n for lines in series.values() for c in lines.values())
    fig.suptitle("Temporal-feature error vs FP per timestep", fontsize=10)
    _legend(fig, handles, "mean over seeds\nband: min-max" if seeds > 1 else "one seed")
    return save(fig, path)


def _quality(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["kind"] == "quality") & (frame["variant"] == "")]


def _with_metric(part: pd.DataFrame, metric: str) -> pd.DataFrame | None:
    """The rows that have `metric`; None when none has it (the plot is then skipped)."""
    if metric not in part or part[metric].notna().sum() == 0:
        return None
    return part[part[metric].notna()]


def plot_metric_vs_bits(frame: pd.DataFrame, path: Path, metric: str = "fid") -> Path | None:
    """One panel per model: `metric` per bit-width, a line per method (mean over seeds, bars: min-max over
    seeds, or the run's bootstrap CI with one seed), FP as a dashed reference line."""
    part = _with_metric(_quality(frame), metric)
    if part is None:
        return None
    models = sorted(set(part["model"]))
    fig, axes = _figure(len(models))
    handles: dict[str, object] = {}
    info = with_extractor(metric_info(metric), table_extractor(part))
    for ax, model in zip(axes, models, strict=True):
        rows = part[part["model"] == model]
        bits = sorted(set(rows.loc[rows["method"] != FP_METHOD, "bits"]), key=lambda b: sort_key("bits", b))
        for method in sorted(set(rows["method"]), key=lambda m: sort_key("method", m)):
            runs = rows[rows["method"] == method]
            color = method_color(method)
            if method == FP_METHOD:
                handles.setdefault(_label(method), ax.axhline(runs[metric].mean(), color=color, linestyle="--"))
                continue
            x, y, err = [], [], []
            for i, b in enumerate(bits):
                values = runs.loc[runs["bits"] == b, metric]
                if values.empty:
                    continue
                lo, hi = _spread(runs[runs["bits"] == b], metric)
                x.append(i)
                y.append(values.mean())
                err.append((values.mean() - lo, hi - values.mean()))
            bar = ax.errorbar(x, y, yerr=np.array(err).T if err else None, marker="o", capsize=3, color=color)
            handles.setdefault(_label(method), bar)
        ax.set_xticks(range(len(bits)), bits)
        better = "higher" if info.higher_is_better else "lower"
        ax.set(title=model, xlabel="bit-width", ylabel=f"{info.display} ({better} is better)")
    fig.suptitle(f"{info.display} vs bit-width", fontsize=10)
    _legend(fig, handles, "bars: min-max over seeds\n(one seed: 95 % bootstrap CI)")
    return save(fig, path)


def _spread(runs: pd.DataFrame, metric: str) -> tuple[float, float]:
    """min-max over seeds; with one seed, its bootstrap CI when recorded, else no spread."""
    if len(runs) > 1:
        return float(runs[metric].min()), float(runs[metric].max())
    lo, hi = f"{metric}_ci_lo", f"{metric}_ci_hi"
    if lo in runs and hi in runs and runs[[lo, hi]].notna().all(axis=None):
        return float(runs[lo].iloc[0]), float(runs[hi].iloc[0])
    value = float(runs[metric].iloc[0])
    return value, value


def plot_bars(frame: pd.DataFrame, path: Path, metric: str, kind: str, group_axis: str) -> Path | None:
    """One panel per model: bars of `metric` (mean over seeds, whiskers min-max) for the records of `kind`,
    grouped on x by `group_axis` (bits for calibration time, backend for latency), one colour per method
    and one hatch per bit-width."""
    part = _with_metric(frame[(frame["kind"] == kind) & (frame["variant"] == "")] if "variant" in frame else frame,
                        metric)
    if part is None:
        return None
    models = sorted(set(part["model"]))
    fig, axes = _figure(len(models))
    handles: dict[str, object] = {}
    hatches: dict[str, object] = {}
    all_bits = sorted(set(part["bits"]), key=lambda b: sort_key("bits", b))
    info = metric_info(metric)
    for ax, model in zip(axes, models, strict=True):
        rows = part[part["model"] == model]
        groups = sorted(set(rows[group_axis]), key=lambda v: sort_key(group_axis, v))
        if group_axis == "bits":  # bits are on x already: one bar per method
            bars = [("", m) for m in sorted(set(rows["method"]), key=lambda m: sort_key("method", m))]
        else:
            bars = sorted(set(zip(rows["bits"], rows["method"], strict=True)),
                          key=lambda k: (sort_key("method", k[1]), sort_key("bits", k[0])))
        width = 0.8 / max(1, len(bars))
        for j, (bits, method) in enumerate(bars):
            for i, g in enumerate(groups):
                hit = (rows[group_axis] == g) & (rows["method"] == method)
                sel = rows[hit & (rows["bits"] == bits)] if bits else rows[hit]
                if sel.empty:
                    continue
                mean = float(sel[metric].mean())
                yerr = [[mean - sel[metric].min()], [sel[metric].max() - mean]] if len(sel) > 1 else None
                hatch = HATCHES[all_bits.index(bits) % len(HATCHES)] if bits else ""
                ax.bar(i - 0.4 + width * (j + 0.5), mean * info.scale, width, yerr=yerr, capsize=2,
                       color=method_color(method), hatch=hatch, edgecolor="white", linewidth=0.5)
                handles.setdefault(_label(method), Patch(color=method_color(method)))
                if bits:
                    hatches.setdefault(bits, Patch(facecolor="lightgrey", hatch=hatch, edgecolor="dimgrey"))
        ax.set_xticks(range(len(groups)), groups, rotation=20 if group_axis == "backend" else 0)
        ax.set(title=model, xlabel=group_axis, ylabel=f"{info.display}")
    seeds = int(part.groupby([group_axis, "method", "bits", "model"]).size().max())
    fig.suptitle(info.display, fontsize=10)
    # methods first, then the bit-width hatches
    _legend(fig, {**handles, **hatches}, "mean over seeds\nwhiskers: min-max" if seeds > 1 else "")
    return save(fig, path)
