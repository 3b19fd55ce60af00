"""Which differences in a table are real: the best value is bold only where it is significantly better
than every other row of its group, and rows within noise of the best are marked as ties.

Two sources of noise are tested, each where the records allow it:
- the eval samples: a paired bootstrap over the same resampled sample indices (runs that share the
  eval noise, using the bootstrap statistics each run saved with its features, see
  harness/metrics/uncertainty.py); without those files, an unpaired normal test from the records'
  bootstrap intervals (<metric>_ci_lo / _ci_hi), with the seeds of one row treated as fully
  correlated (they share the eval noise), which is conservative;
- the seeds (calibration rows, reconstruction minibatches): Welch's t-test on the per-seed values
  when both rows have at least two seeds.
A difference is significant when every available test rejects at `alpha` (intersection-union: the
combined p-value is the largest). Rows with no uncertainty at all (old records, one seed, no CI) are
never declared better; metrics that are exact by construction (byte counts) are compared plainly.

`ordering_flags` marks, for each unbiased metric recorded (FID_inf, KID), where it and FID order two
rows differently: FID at a few thousand samples is biased, and the bias differs between models; KID
also weighs what FID's Gaussian summary leaves out, so it can disagree where FID_inf does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from harness.metrics.uncertainty import Paired, paired_from_statistics, read_bootstrap

ALPHA = 0.05
EXACT_METRICS = frozenset({"weight_bytes", "fp32_weight_bytes", "cache_bytes"})
UNBIASED = ("fid_inf", "kid")  # the unbiased counterparts of FID whose orderings are checked against it
# bootstrap settings that must agree for two runs' statistics to come from the same resamples
_SAME_RESAMPLES = ("n", "resamples", "bootstrap_seed", "max_rows", "eval_seed", "sampler", "extractor")


class Evidence:
    """The per-run bootstrap statistics saved next to each run (read lazily, cached)."""

    def __init__(self, features: Mapping[str, Path] | None = None) -> None:
        self.features = {k: Path(v) for k, v in (features or {}).items()}
        self._cache: dict[str, tuple[dict[str, str], dict[str, np.ndarray]] | None] = {}

    def bootstrap(self, run_id: str) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
        if run_id not in self._cache:
            path = self.features.get(run_id)
            self._cache[run_id] = read_bootstrap(path) if path is not None and path.is_file() else None
        return self._cache[run_id]


@dataclass(frozen=True)
class Comparison:
    """One row against the best row on one metric."""

    p_value: float | None  # None: nothing to test with
    tests: tuple[str, ...]  # which tests contributed ("paired bootstrap", "CI", "seeds")


def paired_difference(best: pd.DataFrame, other: pd.DataFrame, metric: str, evidence: Evidence) -> Paired | None:
    """mean(best) - mean(other) on `metric` with its paired-bootstrap interval and p-value, from the
    statistics each run saved; None when a run has none or the two sides did not share resamples."""
    loaded = [evidence.bootstrap(r) for r in (*best["run_id"], *other["run_id"])]
    if any(x is None or metric not in x[1] for x in loaded):
        return None
    metas = {tuple(x[0].get(k) for k in _SAME_RESAMPLES) for x in loaded}
    if len(metas) != 1:
        return None  # different samples or resamples: not paired
    meta = loaded[0][0]
    n, max_rows = int(meta["n"]), int(meta["max_rows"])
    boots = [x[1][metric] for x in loaded]
    k = len(best)
    return paired_from_statistics(list(best[metric]), boots[:k], list(other[metric]), boots[k:],
                                  float(meta["level"]), math.sqrt(min(n, max_rows) / n))


def _ci_p(best: pd.DataFrame, other: pd.DataFrame, metric: str) -> float | None:
    lo, hi = f"{metric}_ci_lo", f"{metric}_ci_hi"
    if lo not in best or lo not in other or "ci_level" not in best or "ci_level" not in other:
        return None
    sides = []
    for part in (best, other):
        if part[[lo, hi, "ci_level"]].isna().any().any():
            return None
        z = stats.norm.ppf((1 + part["ci_level"]) / 2)
        sides.append(float(((part[hi] - part[lo]) / (2 * z)).mean()))  # seeds share the eval noise
    se = math.hypot(*sides)
    diff = float(best[metric].mean() - other[metric].mean())
    if se == 0:
        return 1.0 if diff == 0 else 0.0
    return float(2 * stats.norm.sf(abs(diff) / se))


def _seed_p(best: pd.DataFrame, other: pd.DataFrame, metric: str) -> float | None:
    a, b = best[metric].to_numpy(float), other[metric].to_numpy(float)
    if len(a) < 2 or len(b) < 2:
        return None
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def compare(best: pd.DataFrame, other: pd.DataFrame, metric: str, evidence: Evidence | None = None) -> Comparison:
    """Test `best` (the records of one row) against `other` on `metric`; see the module docstring."""
    best, other = best[best[metric].notna()], other[other[metric].notna()]
    found: dict[str, float] = {}
    paired = paired_difference(best, other, metric, evidence) if evidence is not None else None
    if paired is not None:
        found["paired bootstrap"] = paired.p_value
    elif (ci := _ci_p(best, other, metric)) is not None:
        found["CI"] = ci
    if (seeds := _seed_p(best, other, metric)) is not None:
        found["seeds"] = seeds
    if not found:
        return Comparison(None, ())
    return Comparison(max(found.values()), tuple(found))


@dataclass(frozen=True)
class Marks:
    """Per row of a group (same order as given): bold best, tie marks, and the tests used."""

    bold: tuple[bool, ...]
    tie: tuple[bool, ...]
    tests: frozenset[str]


def mark_group(parts: Sequence[pd.DataFrame], metric: str, higher_is_better: bool | None, alpha: float = ALPHA,
               evidence: Evidence | None = None) -> Marks:
    """Bold the best row of `parts` (each the records of one row) only if significantly better than
    every other row at `alpha`; otherwise mark it and the rows within noise of it as ties."""
    n = len(parts)
    means = [float(p[metric].mean()) if metric in p and p[metric].notna().any() else math.nan for p in parts]
    shown = [i for i in range(n) if math.isfinite(means[i])]
    none = Marks((False,) * n, (False,) * n, frozenset())
    if higher_is_better is None or len(shown) < 2:
        return none
    best = (max if higher_is_better else min)(shown, key=lambda i: means[i])
    if metric in EXACT_METRICS:
        return Marks(tuple(means[i] == means[best] for i in range(n)), (False,) * n, frozenset({"exact"}))
    results = {i: compare(parts[best], parts[i], metric, evidence) for i in shown if i != best}
    if all(r.p_value is None for r in results.values()):
        return none
    tied = {i for i, r in results.items() if r.p_value is None or r.p_value >= alpha}
    tests = frozenset(t for r in results.values() for t in r.tests)
    if not tied:
        return Marks(tuple(i == best for i in range(n)), (False,) * n, tests)
    return Marks((False,) * n, tuple(i == best or i in tied for i in range(n)), tests)


def ordering_flags(means: Mapping[str, Sequence[float]]) -> dict[str, tuple[bool, ...]]:
    """Per unbiased metric with at least two rows: per row, whether FID and that metric order this row
    differently against some other row. `means` maps metric keys to per-row means (nan where absent);
    all are lower-better."""
    if "fid" not in means:
        return {}
    fid = np.asarray(means["fid"], float)
    flags: dict[str, tuple[bool, ...]] = {}
    for key in UNBIASED:
        if key not in means:
            continue
        other = np.asarray(means[key], float)
        ok = np.isfinite(fid) & np.isfinite(other)
        if ok.sum() < 2:
            continue
        d_fid = np.sign(fid[:, None] - fid[None, :])
        d_other = np.sign(other[:, None] - other[None, :])
        both = ok[:, None] & ok[None, :]
        discordant = both & (d_fid * d_other < 0)
        flags[key] = tuple(bool(x) for x in discordant.any(axis=1))
    return flags
