"""The paper-style table as data: groups (model, bit-width), one row per method, mean/std/n per cell.

Pure functions over the records DataFrame, so the structure (FP first, bold best, std only with
several seeds) is tested without rendering; render.py turns a `Table` into LaTeX/Markdown/CSV.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from harness.aggregate.frame import AXES, FP_BITS
from harness.aggregate.metric_info import DEFAULT_METRICS, METRIC_INFO, MetricInfo, metric_info

AXIS_TITLES = {"model": "Model", "bits": "Bits", "method": "Method", "variant": "Variant",
               "backend": "Backend", "sampler": "Sampler"}
METHOD_LABELS = {"fp": "FP", "rtn": "RTN", "ptq4dm": "PTQ4DM", "qdiff": "Q-Diffusion", "tfmq": "TFMQ-DM"}
METHOD_ORDER = ("fp", "rtn", "ptq4dm", "qdiff", "tfmq")  # reference, baselines, the star method last
FULL_VARIANT = "full"
LOAD_MARK = "*"
LOAD_NOTE = ("*: measured under load (another harness process was running, or the load average exceeded "
             "the core count); its latencies are inflated")
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass(frozen=True)
class Cell:
    mean: float | None  # None: no run of this row reported the metric
    std: float | None  # sample std over seeds; None with fewer than two values
    n: int
    bold: bool = False


@dataclass(frozen=True)
class Row:
    group: tuple[str, ...]  # display values of Table.group_cols, e.g. ("ddpm_mnist", "w4a8")
    label: tuple[str, ...]  # display values of Table.label_cols, e.g. ("TFMQ-DM",)
    n: int  # records (seeds) averaged in this row
    cells: tuple[Cell, ...]


@dataclass(frozen=True)
class Table:
    name: str
    group_cols: tuple[str, ...]
    label_cols: tuple[str, ...]
    metrics: tuple[MetricInfo, ...]
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()  # printed under the table / in the LaTeX caption

    @property
    def show_n(self) -> bool:
        return any(r.n > 1 for r in self.rows)


def sort_key(axis: str, value: str) -> tuple:
    if axis == "bits":
        m = _BITS_RE.match(value)
        if value == FP_BITS:
            return (0,)
        return (1, -int(m[1]), -int(m[2])) if m else (2, value)
    if axis == "method":
        return (METHOD_ORDER.index(value), "") if value in METHOD_ORDER else (len(METHOD_ORDER), value)
    if axis == "variant":
        return (value == "", value)  # the full method after its ablations
    return (value,)


def _display(axis: str, value: str) -> str:
    if axis == "method":
        return METHOD_LABELS.get(value, value)
    if axis == "variant":
        return value or FULL_VARIANT
    return value


def present_metrics(frame: pd.DataFrame) -> list[str]:
    """Metric columns with at least one value in `frame`."""
    return [c for c in frame.columns
            if c not in AXES and frame[c].dtype.kind == "f" and frame[c].notna().any()]


def check_metrics(frame: pd.DataFrame, requested: Sequence[str]) -> None:
    """Refuse metric keys that are neither in the store nor registered (typos), with a hint."""
    present = present_metrics(frame)
    for key in requested:
        if key not in present and key not in METRIC_INFO:
            close = difflib.get_close_matches(key, present + METRIC_INFO.names(), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"--metrics {key!r} is neither in the store nor a known metric; "
                             f"the store has: {', '.join(present) or 'none'}.{hint}")


def choose_metrics(part: pd.DataFrame, kind: str, requested: Sequence[str] = ()) -> list[str]:
    """The requested metrics these records have; else the kind's defaults they have; else all."""
    present = present_metrics(part)
    chosen = [k for k in requested if k in present]
    chosen = chosen or [k for k in DEFAULT_METRICS[kind] if k in present]
    return chosen or present


def _cell(values: pd.Series) -> Cell:
    finite = [float(v) for v in values if pd.notna(v)]
    if not finite:
        return Cell(None, None, 0)
    mean = sum(finite) / len(finite)
    std = pd.Series(finite).std() if len(finite) > 1 else None
    return Cell(mean, std, len(finite))


def _bold_best(rows: list[Row], metrics: Sequence[MetricInfo]) -> list[Row]:
    """Bold the best shown value of each metric among the rows of one group (ties all bold)."""
    cells = [list(r.cells) for r in rows]
    for j, info in enumerate(metrics):
        shown = [(i, float(info.format(c[j].mean))) for i, c in enumerate(cells)
                 if c[j].mean is not None and math.isfinite(c[j].mean)]
        if info.higher_is_better is None or len(shown) < 2:
            continue
        best = (max if info.higher_is_better else min)(v for _, v in shown)
        for i, v in shown:
            if v == best:
                cells[i][j] = Cell(cells[i][j].mean, cells[i][j].std, cells[i][j].n, bold=True)
    return [Row(r.group, r.label, r.n, tuple(c)) for r, c in zip(rows, cells, strict=True)]


def build_table(frame: pd.DataFrame, name: str, metrics: Sequence[str], group_by: Sequence[str],
                row_by: Sequence[str]) -> Table:
    """Group rows by `group_by`, one row per `row_by` value; axes that vary elsewhere join `row_by`
    so different configurations are never averaged together."""
    row_by = [*row_by, *(a for a in AXES if a not in (*group_by, *row_by) and frame[a].nunique() > 1)]
    keys = [*group_by, *row_by]
    infos = tuple(metric_info(k) for k in metrics)
    groups: dict[tuple, list[tuple[tuple, Row]]] = {}
    for values, part in frame.groupby(keys, sort=False, dropna=False):
        g, r = values[: len(group_by)], values[len(group_by):]
        cells = tuple(_cell(part[k]) if k in part else Cell(None, None, 0) for k in metrics)
        label = tuple(_display(a, v) for a, v in zip(row_by, r, strict=True))
        if name == "latency" and "under_load" in part and part["under_load"].any():
            label = (*label[:-1], label[-1] + LOAD_MARK)  # timings contended: see LOAD_NOTE
        row = Row(tuple(_display(a, v) for a, v in zip(group_by, g, strict=True)), label, len(part), cells)
        gkey = tuple(sort_key(a, v) for a, v in zip(group_by, g, strict=True))
        groups.setdefault(gkey, []).append((tuple(sort_key(a, v) for a, v in zip(row_by, r, strict=True)), row))
    rows: list[Row] = []
    for gkey in sorted(groups):
        rows += _bold_best([row for _, row in sorted(groups[gkey], key=lambda kr: kr[0])], infos)
    loaded = any(r.label and r.label[-1].endswith(LOAD_MARK) for r in rows)
    return Table(name, tuple(AXIS_TITLES[a] for a in group_by), tuple(AXIS_TITLES[a] for a in row_by), infos,
                 tuple(rows), (LOAD_NOTE,) if loaded else ())


# kind -> (group_by, row_by): the layout of each table the aggregator writes.
LAYOUTS = {
    "quality": (("model", "bits"), ("method",)),
    "ablation": (("model", "bits"), ("method", "variant")),
    "latency": (("model", "backend"), ("bits", "method")),
}


def select_records(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """quality: the main comparison (no ablation variants); ablation: every method that has
    variants, its full form included; latency: records of kind latency."""
    if kind not in LAYOUTS:
        raise ValueError(f"<--kind={kind}> is not a table kind; accepted: {', '.join(LAYOUTS)}")
    if kind == "latency":
        return frame[frame["kind"] == "latency"]
    quality = frame[frame["kind"] == "quality"]
    if kind == "quality":
        return quality[quality["variant"] == ""]
    variants = quality[quality["variant"] != ""]
    # only the (model, bits, method) cells that were ablated, each with its full form
    ablated = pd.MultiIndex.from_frame(variants[["model", "bits", "method"]])
    return quality[pd.MultiIndex.from_frame(quality[["model", "bits", "method"]]).isin(ablated)]


def make_table(frame: pd.DataFrame, kind: str, metrics: Sequence[str] = ()) -> Table:
    """The table of one kind from the records frame (empty rows when the store has none)."""
    check_metrics(frame, metrics)
    part = select_records(frame, kind)
    group_by, row_by = LAYOUTS[kind]
    return build_table(part, kind, choose_metrics(part, kind, metrics), group_by, row_by)
