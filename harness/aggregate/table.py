"""The paper-style table as data: groups (model, bit-width), one row per method, mean/std/n per cell.

Pure functions over the records DataFrame, so the structure (FP first, bold best, std only with
several seeds) is tested without rendering; render.py turns a `Table` into LaTeX/Markdown/CSV.
A cell carries its uncertainty: the std over seeds (n > 1) or the run's bootstrap CI (n = 1). The best
value is bold only where significance.py finds it significantly better than every other row of its
group; rows within noise of the best are ties; FID cells are flagged where FID and an unbiased metric
(FID∞: ‡, KID: §) disagree on an ordering. `Table.notes` says all of this in words (the caption).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import pandas as pd

from harness.aggregate.frame import AXES, FP_BITS
from harness.aggregate.metric_info import (
    DEFAULT_METRICS,
    METRIC_INFO,
    MetricInfo,
    metric_info,
    with_extractor,
)
from harness.aggregate.significance import ALPHA, UNBIASED, Evidence, mark_group, ordering_flags

# the mark of a FID cell that an unbiased metric orders differently, and that metric in the caption
FLAG_NAMES = {"fid_inf": ("‡", "FID∞ (FID extrapolated to infinitely many samples)"), "kid": ("§", "KID")}

AXIS_TITLES = {"model": "Model", "bits": "Bits", "method": "Method", "variant": "Variant",
               "backend": "Backend", "sampler": "Sampler"}
METHOD_LABELS = {"fp": "FP", "rtn": "RTN", "ptq4dm": "PTQ4DM", "qdiff": "Q-Diffusion", "tfmq": "TFMQ-DM"}
METHOD_ORDER = ("fp", "rtn", "ptq4dm", "qdiff", "tfmq")  # reference, baselines, the star method last
FULL_VARIANT = "full"
LOAD_MARK = "*"
LOAD_NOTE = ("*: measured under load (another harness process was running, or the load average exceeded "
             "the core count); its latencies are inflated")
_BITS_RE = re.compile(r"^w(\d+)a(\d+)$")
_NOT_METRICS = re.compile(r"_ci_(lo|hi)$|^ci_(level|resamples)$")  # uncertainty columns, never table columns
_BATCH_DEFAULT = re.compile(r"^(.*_b)<(min|max)>$")  # a DEFAULT_METRICS key measured at several batch sizes
TITLES = {"quality": "Sample quality of each PTQ method per model and bit-width, against the FP model",
          "ablation": "Ablation: each variant of a method (components on or off) beside the full method",
          "latency": "Denoiser latency and packed weight memory per backend"}
EXTRACTOR_NOTES = {
    "lenet": "FID, sFID, IS and KID use LeNet-5 features (MNIST models; LeNet-FID is not comparable with "
             "Inception FID).",
    "inception": "FID, sFID, IS and KID use InceptionV3 features.",
    "mixed": "FID, sFID, IS and KID use LeNet-5 features for MNIST models and InceptionV3 features otherwise.",
}
TEST_NAMES = {"paired bootstrap": "a paired bootstrap over the shared eval samples",
              "CI": "the runs' bootstrap intervals", "seeds": "Welch's t-test over seeds",
              "exact": "exact values (byte counts)"}


@dataclass(frozen=True)
class Cell:
    mean: float | None  # None: no run of this row reported the metric
    std: float | None  # sample std over seeds; None with fewer than two values
    n: int
    bold: bool = False  # significantly better than every other row of the group
    ci: tuple[float, float] | None = None  # bootstrap CI of a single run (n = 1)
    tie: bool = False  # tied for best: the best, or within noise of it
    flags: tuple[str, ...] = ()  # unbiased metrics (UNBIASED keys) that order this row against another unlike FID


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
    title: str = ""  # the caption's first sentence: what the table shows

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
    return [c for c in frame.columns if c not in AXES and not _NOT_METRICS.search(c)
            and frame[c].dtype.kind == "f" and frame[c].notna().any()]


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
    chosen = chosen or [k for d in DEFAULT_METRICS[kind] if (k := _batch_key(d, present)) in present]
    return chosen or present


def _batch_key(key: str, present: Sequence[str]) -> str:
    """`latency_ms_b<min>` -> the present `latency_ms_b<N>` of the smallest N (largest for <max>)."""
    m = _BATCH_DEFAULT.match(key)
    if not m:
        return key
    sizes = [int(k[len(m[1]):]) for k in present if k.startswith(m[1]) and k[len(m[1]):].isdigit()]
    return f"{m[1]}{(min if m[2] == 'min' else max)(sizes)}" if sizes else key


def _cell(part: pd.DataFrame, key: str) -> Cell:
    if key not in part:
        return Cell(None, None, 0)
    finite = [float(v) for v in part[key] if pd.notna(v)]
    if not finite:
        return Cell(None, None, 0)
    mean = sum(finite) / len(finite)
    std = pd.Series(finite).std() if len(finite) > 1 else None
    ci = None
    lo, hi = f"{key}_ci_lo", f"{key}_ci_hi"
    if len(finite) == 1 and lo in part and hi in part:
        row = part[part[key].notna()].iloc[0]
        ci = (float(row[lo]), float(row[hi])) if pd.notna(row[lo]) and pd.notna(row[hi]) else None
    return Cell(mean, std, len(finite), ci=ci)


def _mark(rows: list[Row], parts: list[pd.DataFrame], metrics: Sequence[MetricInfo], alpha: float,
          evidence: Evidence | None) -> tuple[list[Row], set[str], set[str]]:
    """Significance marks and FID ordering flags for the rows of one group; also returns the tests
    used and the unbiased metrics that flagged some row."""
    cells = [list(r.cells) for r in rows]
    tests: set[str] = set()
    for j, info in enumerate(metrics):
        marks = mark_group(parts, info.key, info.higher_is_better, alpha, evidence)
        tests |= marks.tests
        for i in range(len(rows)):
            cells[i][j] = replace(cells[i][j], bold=marks.bold[i], tie=marks.tie[i])
    flagged_by: set[str] = set()
    if "fid" in [m.key for m in metrics]:
        means = {k: [float(p[k].mean()) if k in p and p[k].notna().any() else math.nan for p in parts]
                 for k in ("fid", *UNBIASED)}
        flags = ordering_flags(means)
        j = [m.key for m in metrics].index("fid")
        for i in range(len(rows)):
            by = tuple(k for k in UNBIASED if k in flags and flags[k][i])
            cells[i][j] = replace(cells[i][j], flags=by)
            flagged_by.update(by)
    return [Row(r.group, r.label, r.n, tuple(c)) for r, c in zip(rows, cells, strict=True)], tests, flagged_by


def _notes(rows: Sequence[Row], alpha: float, tests: set[str], flagged_by: set[str],
           level: float | None, resamples: float | None, samples: int | None = None) -> tuple[str, ...]:
    notes = []
    has_ci = any(c.ci is not None and c.std is None for r in rows for c in r.cells)
    has_std = any(c.std is not None for r in rows for c in r.cells)
    parts = []
    if has_std:
        parts.append("mean ± std over seeds (n > 1)")
    if has_ci:
        what = f"{100 * level:g} % " if level else ""
        evals = f"{samples:,} eval samples" if samples else "eval samples"
        parts.append(f"value ± half-width of its {what}bootstrap CI over the {evals} (n = 1"
                     + (f", {int(resamples)} resamples)" if resamples else ")"))
    if parts:
        seeds = "n: seeds averaged in a row" if any(r.n > 1 for r in rows) else "n = 1: one seed per row"
        notes.append("Cells: " + "; ".join(parts) + f"; {seeds}.")
    if tests:
        used = ", ".join(TEST_NAMES[t] for t in sorted(tests))
        notes.append(f"Bold: significantly better than every other row of its group at alpha = {alpha:g} "
                     f"(tests: {used}; a difference counts only if every available test rejects). "
                     "≈: tied for best (the best and the rows within noise of it). Cells without any "
                     "measured uncertainty are never bold.")
    else:
        notes.append("No row carries a measured uncertainty (bootstrap CI or several seeds): nothing is bold.")
    for key in (k for k in UNBIASED if k in flagged_by):
        mark, name = FLAG_NAMES[key]
        notes.append(f"{mark}: FID and {name}, which is unbiased at small n, order this row differently against "
                     "another row of its group.")
    return tuple(notes)


def build_table(frame: pd.DataFrame, name: str, metrics: Sequence[str], group_by: Sequence[str],
                row_by: Sequence[str], alpha: float = ALPHA, evidence: Evidence | None = None) -> Table:
    """Group rows by `group_by`, one row per `row_by` value; axes that vary elsewhere join `row_by`
    so different configurations are never averaged together."""
    row_by = [*row_by, *(a for a in AXES if a not in (*group_by, *row_by) and frame[a].nunique() > 1)]
    keys = [*group_by, *row_by]
    extractor = table_extractor(frame)
    infos = tuple(with_extractor(metric_info(k), extractor) for k in metrics)
    groups: dict[tuple, list[tuple[tuple, Row, pd.DataFrame]]] = {}
    for values, part in frame.groupby(keys, sort=False, dropna=False):
        g, r = values[: len(group_by)], values[len(group_by):]
        cells = tuple(_cell(part, k) for k in metrics)
        label = tuple(_display(a, v) for a, v in zip(row_by, r, strict=True))
        if name == "latency" and "under_load" in part and part["under_load"].any():
            label = (*label[:-1], label[-1] + LOAD_MARK)  # timings contended: see LOAD_NOTE
        row = Row(tuple(_display(a, v) for a, v in zip(group_by, g, strict=True)), label, len(part), cells)
        gkey = tuple(sort_key(a, v) for a, v in zip(group_by, g, strict=True))
        rkey = tuple(sort_key(a, v) for a, v in zip(row_by, r, strict=True))
        groups.setdefault(gkey, []).append((rkey, row, part))
    rows: list[Row] = []
    tests: set[str] = set()
    flagged_by: set[str] = set()
    for gkey in sorted(groups):
        ordered = sorted(groups[gkey], key=lambda item: item[0])
        marked, used, flag = _mark([row for _, row, _ in ordered], [p for _, _, p in ordered], infos, alpha, evidence)
        rows += marked
        tests |= used
        flagged_by |= flag
    level = _setting(frame, "ci_level")
    samples = _setting(frame, "eval_samples")
    notes = _notes(rows, alpha, tests, flagged_by, level, _setting(frame, "ci_resamples"),
                   int(samples) if samples else None)
    notes += _metric_notes(frame, infos)
    if any(r.label and r.label[-1].endswith(LOAD_MARK) for r in rows):
        notes += (LOAD_NOTE,)
    return Table(name, tuple(AXIS_TITLES[a] for a in group_by), tuple(AXIS_TITLES[a] for a in row_by), infos,
                 tuple(rows), notes, TITLES.get(name, ""))


def table_extractor(frame: pd.DataFrame) -> str:
    """The feature network of a table's rows: lenet, inception, mixed, or '' (no quality rows)."""
    names = set(frame["extractor"]) - {""} if "extractor" in frame else set()
    return names.pop() if len(names) == 1 else "mixed" if names else ""


def _metric_notes(frame: pd.DataFrame, infos: Sequence[MetricInfo]) -> tuple[str, ...]:
    """What the features are and what the less obvious columns mean (units, scales)."""
    notes = []
    feature_metrics = {"fid", "fid_inf", "sfid", "is", "kid"}
    extractor = table_extractor(frame)
    if extractor in EXTRACTOR_NOTES and feature_metrics & {i.key for i in infos}:
        notes.append(EXTRACTOR_NOTES[extractor])
    meanings = [i.meaning for i in infos if i.meaning]
    if meanings:
        notes.append(" ".join(meanings))
    return tuple(notes)


def _setting(frame: pd.DataFrame, key: str) -> float | None:
    """A bootstrap setting when every record that has it agrees, else None (the caption omits it)."""
    if key not in frame:
        return None
    values = set(frame[key].dropna())
    return float(values.pop()) if len(values) == 1 else None


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


def make_table(frame: pd.DataFrame, kind: str, metrics: Sequence[str] = (), alpha: float = ALPHA,
               evidence: Evidence | None = None) -> Table:
    """The table of one kind from the records frame (empty rows when the store has none); `alpha` is
    the significance level of the bold / tie marks, `evidence` the runs' saved bootstrap statistics."""
    if not 0 < alpha < 1:
        raise ValueError(f"<alpha={alpha}> must be in (0, 1)")
    check_metrics(frame, metrics)
    part = select_records(frame, kind)
    group_by, row_by = LAYOUTS[kind]
    return build_table(part, kind, choose_metrics(part, kind, metrics), group_by, row_by, alpha, evidence)
