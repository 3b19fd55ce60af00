"""Store records -> the tidy DataFrame the tables are built from (finished runs, one row each).

Here the store's conventions become table conventions: FP is one row per model tagged w32a32,
scalar temporal errors are derived from curves when a run stored only the curve, and two records
of the same configuration axes and seed (e.g. a rerun with another recipe) are not silently
averaged as if they were seeds: the newest wins and a warning names the others.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import replace

import pandas as pd

from harness.aggregate.metric_info import DERIVED_FROM_CURVES
from harness.store import RunRecord, records_to_dataframe

FP_METHOD = "fp"
FP_BITS = "w32a32"
# The axes that tell runs apart in a table; everything else a row averages over is a seed.
AXES = ("model", "bits", "method", "variant", "backend", "sampler")


def _derive(record: RunRecord) -> RunRecord:
    steps = record.curves.get("timesteps")
    extra = {}
    for key, curve in DERIVED_FROM_CURVES.items():
        values = record.curves.get(curve)
        if key not in record.metrics and steps and isinstance(values, list) and len(values) == len(steps):
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            if finite:
                extra[key] = sum(finite) / len(finite)
    if not extra:
        return record
    return replace(record, metrics={**record.metrics, **extra})


def extractor(record: RunRecord) -> str:
    """The features behind a quality record's FID/IS/KID, `auto` resolved as the runner does
    (harness/evaluate.py: LeNet-5 for MNIST models, Inception otherwise); '' when not recorded."""
    if record.kind != "quality":
        return ""
    name = str((record.config.get("eval") or {}).get("extractor", ""))
    if name == "auto":
        return "lenet" if (record.config.get("model") or {}).get("dataset") == "mnist" else "inception"
    return name


def finite_only(records: Sequence[RunRecord]) -> list[RunRecord]:
    """Leave out, with a warning, finished records holding a NaN or inf metric: records written before
    the runner failed such runs (a diverged model) must never reach a table as a number."""
    bad = [r for r in records if not all(math.isfinite(v) for v in r.metrics.values())]
    if bad:
        warnings.warn(f"{len(bad)} finished record(s) hold non-finite metrics and are left out of the tables: "
                      f"{[r.run_id for r in bad]}", stacklevel=2)
    return [r for r in records if all(r is not b for b in bad)]


def records_frame(records: Sequence[RunRecord], dedupe: bool = True) -> pd.DataFrame:
    """Finished records with finite metrics as a DataFrame with axis columns as plain strings ('' = not
    set), `under_load` (whether the run's timings were measured under contention), `extractor` (the
    feature network of its quality metrics) and `eval_samples` (how many samples they saw). `dedupe`:
    one record per axes and seed, as a table needs (harness.compare keeps runs that differ elsewhere)."""
    finished = [_derive(r) for r in finite_only([r for r in records if r.finished])]
    frame = records_to_dataframe(finished)
    frame["under_load"] = [bool(r.environment.get("under_load", False)) for r in finished]
    frame["extractor"] = [extractor(r) for r in finished]
    # object dtype: a settings column, never mistaken for a float metric column
    frame["eval_samples"] = pd.Series([(r.config.get("eval") or {}).get("n_samples") for r in finished],
                                      index=frame.index, dtype=object)
    for axis in AXES:
        frame[axis] = frame[axis].astype(object).where(frame[axis].notna(), "").astype(str)
    frame.loc[frame["method"] == FP_METHOD, "bits"] = FP_BITS
    return drop_duplicate_seeds(frame) if dedupe else frame


def drop_duplicate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep the newest record per (axes, seed); warn about the ones dropped."""
    keys = [*AXES, "seed"]
    ordered = frame.sort_values(["created", "run_id"], kind="stable")
    dup = ordered.duplicated(keys, keep="last")
    if dup.any():
        dropped = ordered.loc[dup, "run_id"].tolist()
        warnings.warn(
            f"{len(dropped)} record(s) repeat the axes and seed of a newer record and are left out of the "
            f"tables (different configs outside the axes, e.g. recipe or eval size): {dropped}",
            stacklevel=2,
        )
    return ordered.loc[~dup].reset_index(drop=True)


def filter_frame(frame: pd.DataFrame, model: Sequence[str] = (), bits: Sequence[str] = (),
                 method: Sequence[str] = ()) -> pd.DataFrame:
    """Keep the named values of each axis (empty = all). FP rows survive a bits filter: they are
    the reference of every bit-width. Unknown values warn with the values the store has."""
    keep = pd.Series(True, index=frame.index)
    for axis, wanted in (("model", model), ("bits", bits), ("method", method)):
        if not wanted:
            continue
        missing = sorted(set(wanted) - set(frame[axis]))
        if missing:
            warnings.warn(f"--{axis} {missing} not in the store; it has: {sorted(set(frame[axis]))}", stacklevel=2)
        hit = frame[axis].isin(list(wanted))
        if axis == "bits":
            hit |= frame["method"] == FP_METHOD
        keep &= hit
    return frame.loc[keep].reset_index(drop=True)
