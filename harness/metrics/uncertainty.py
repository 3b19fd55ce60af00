"""Bootstrap uncertainty of the sample metrics, paired tests between runs, and FID extrapolated to n -> inf.

Why over features: the metric of a resample is recomputed from the features already extracted, so a
confidence interval costs matrix algebra, not sampling or feature extraction. The reference side
(dataset statistics) is fixed; only the generated samples are resampled, because they are what a
method changes.

A resample is a row of multinomial counts W (B, n) over the n samples, so every statistic is a
weighted sum and all B resamples are computed together (no Python loop over samples):
- FID / sFID: weighted mean and covariance, and tr sqrt(S_ref^1/2 S S_ref^1/2) from the
  eigenvalues of a symmetric matrix (the "eigh trick"; S_ref^1/2 is computed once);
- KID: the unbiased MMD^2 with torch-fidelity's cubic kernel on the full sets, with the diagonal
  of each resample's duplicates removed (w'Kw - w.diag(K));
- IS: exp(E_x KL(p(y|x) || p(y))) with p(y) the resample's mean prediction;
- PSNR, class accuracy, confident fraction: means of per-sample values.

Intervals are "recentred percentile" intervals: point + the central `level` range of the bootstrap
deviations (theta* - mean theta*). FID's bootstrap distribution sits above the point estimate
(duplicates shrink the effective sample size, and FID is biased upward at small n), so plain
percentiles would often exclude the value the table shows; the spread is what the bootstrap gets
right, the bias is what `fid_infinity` addresses. KID and IS intervals use the full-set statistic's
spread around the record's split/subset estimate.

Runs that share the eval noise (same eval seed and sample count) have sample i drawn from the same
initial noise, so a paired bootstrap applies the same counts to both: the difference of the two
statistics has much less variance than either alone. With more than `max_rows` samples only the
first `max_rows` are resampled and the deviations are scaled by sqrt(max_rows / n) (m-out-of-n
bootstrap), which keeps 50k-sample evaluations cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

RESAMPLES = 200
LEVEL = 0.95
MAX_ROWS = 5000
_CHUNK_ELEMENTS = 1 << 24  # float64 elements of one batched covariance product (~128 MB)
# metric key -> the per-sample arrays it needs (see SampleSet)
METRIC_INPUTS = {"fid": ("pooled",), "sfid": ("spatial",), "kid": ("pooled",), "is": ("logits",),
                 "psnr_vs_fp": ("psnr",), "class_accuracy": ("correct",), "confident_fraction": ("confident",)}
FEATURES_FILE = "eval_features.safetensors"


@dataclass(frozen=True)
class Bootstrap:
    """Settings of a bootstrap: resamples B, interval level, seed of the counts, row cap."""

    resamples: int = RESAMPLES
    level: float = LEVEL
    seed: int = 0
    max_rows: int = MAX_ROWS

    def __post_init__(self) -> None:
        if self.resamples < 10:
            raise ValueError(f"<resamples={self.resamples}> must be >= 10")
        if not 0.5 <= self.level < 1:
            raise ValueError(f"<level={self.level}> must be in [0.5, 1)")
        if self.max_rows < 10:
            raise ValueError(f"<max_rows={self.max_rows}> must be >= 10")

    def counts(self, n: int) -> np.ndarray:
        """(B, m) multinomial counts over the first m = min(n, max_rows) samples, each row summing to m."""
        m = min(n, self.max_rows)
        rng = np.random.default_rng(self.seed)
        return rng.multinomial(m, np.full(m, 1.0 / m), size=self.resamples).astype(np.float64)

    def scale(self, n: int) -> float:
        """sqrt(m / n): the m-out-of-n correction of the deviations (1 when every row is resampled)."""
        return float(np.sqrt(min(n, self.max_rows) / n))


DEFAULT_BOOTSTRAP = Bootstrap()


@dataclass
class SampleSet:
    """Per-sample quantities of one run (rows in eval-noise order) and the fixed reference statistics.

    Any array may be None when the run did not measure it. `reference` holds pooled_mu/sigma,
    spatial_mu/sigma and kid_pooled as `harness.metrics.fidelity.reference_features` returns them.
    """

    pooled: np.ndarray | None = None
    spatial: np.ndarray | None = None
    logits: np.ndarray | None = None
    psnr: np.ndarray | None = None
    correct: np.ndarray | None = None
    confident: np.ndarray | None = None
    reference: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        for key in ("pooled", "spatial", "logits", "psnr", "correct", "confident"):
            v = getattr(self, key)
            if v is not None:
                return len(v)
        return 0

    def available(self) -> list[str]:
        """The metrics this set can bootstrap."""
        have = {k for k in ("pooled", "spatial", "logits", "psnr", "correct", "confident")
                if getattr(self, k) is not None}
        refs = {"fid": "pooled_mu", "sfid": "spatial_mu", "kid": "kid_pooled"}
        return [m for m, need in METRIC_INPUTS.items()
                if set(need) <= have and (m not in refs or refs[m] in self.reference)]

    def head(self, m: int) -> SampleSet:
        """The first `m` samples (same reference)."""
        cut = {k: None if getattr(self, k) is None else getattr(self, k)[:m]
               for k in ("pooled", "spatial", "logits", "psnr", "correct", "confident")}
        return SampleSet(**cut, reference=self.reference)

    # -- on disk ---------------------------------------------------------------------------------
    def save(self, path: Path, meta: Mapping[str, Any] | None = None,
             boot: Mapping[str, np.ndarray] | None = None) -> Path:
        """safetensors: arrays as float32 (reference moments and `boot`, the bootstrap statistics,
        float64), `meta` as string metadata."""
        tensors = {f"boot.{k}": np.ascontiguousarray(v, np.float64) for k, v in (boot or {}).items()}
        tensors |= {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32)
                    for k in ("pooled", "spatial", "logits", "psnr", "correct", "confident")
                    if getattr(self, k) is not None}
        for k, v in self.reference.items():
            dtype = np.float64 if k.endswith(("_mu", "_sigma")) else np.float32
            tensors[f"reference.{k}"] = np.ascontiguousarray(v, dtype=dtype)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={k: str(v) for k, v in (meta or {}).items()})
        return path

    @classmethod
    def load(cls, path: Path) -> SampleSet:
        t = {k: v.astype(np.float64) for k, v in load_file(str(path)).items() if not k.startswith("boot.")}
        ref = {k.removeprefix("reference."): v for k, v in t.items() if k.startswith("reference.")}
        return cls(**{k: t.get(k) for k in ("pooled", "spatial", "logits", "psnr", "correct", "confident")},
                   reference=ref)


def read_bootstrap(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(string metadata, {metric: bootstrap statistics}) saved with a SampleSet; reads nothing else."""
    with safe_open(str(path), framework="numpy") as f:
        boot = {k.removeprefix("boot."): f.get_tensor(k) for k in f.keys() if k.startswith("boot.")}  # noqa: SIM118
        return dict(f.metadata() or {}), boot


# -- statistics of weighted multisets (rows of W) ---------------------------------------------------
def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def weighted_fid(x: np.ndarray, w: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> np.ndarray:
    """FID of each weighted multiset (rows of `w`, counts over the rows of `x` (n, d)) against N(mu, sigma).

    X' diag(w) X is one batched torch matmul per chunk (numpy's stacked matmul is several times
    slower); the eigenvalues are numpy's (float64)."""
    x = np.asarray(x, np.float64)
    w = np.atleast_2d(np.asarray(w, np.float64))
    total = w.sum(1)
    mu = (w @ x) / total[:, None]
    sigma_ref = np.asarray(sigma_ref, np.float64)
    root = _sym_sqrt(sigma_ref)
    n, d = x.shape
    if n < d:
        return _weighted_fid_gram(x, w, mu, total, mu_ref, sigma_ref)
    import torch  # only when computing: reading saved statistics (the tables) never needs torch

    xt = torch.from_numpy(x)
    # Both the weighted rows (n*d) and each resample's covariance (d*d) count: 2048-d Inception
    # features at 200 resamples per chunk would be 6.7 GB of covariances alone.
    chunk = max(1, _CHUNK_ELEMENTS // max(n * d, d * d))
    out = np.empty(len(w))
    for s in range(0, len(w), chunk):
        wc, muc, tc = w[s:s + chunk], mu[s:s + chunk], total[s:s + chunk]
        second = torch.matmul(xt.T[None] * torch.from_numpy(wc)[:, None, :], xt).numpy()  # X' diag(w) X
        cov = (second - tc[:, None, None] * muc[:, :, None] * muc[:, None, :]) / (tc - 1)[:, None, None]
        eig = np.linalg.eigvalsh(root @ cov @ root)
        tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum(1)
        diff = ((muc - mu_ref) ** 2).sum(1)
        out[s:s + chunk] = diff + np.trace(cov, axis1=1, axis2=2) + np.trace(sigma_ref) - 2 * tr_sqrt
    return out


def _weighted_fid_gram(x: np.ndarray, w: np.ndarray, mu: np.ndarray, total: np.ndarray, mu_ref: np.ndarray,
                       sigma_ref: np.ndarray) -> np.ndarray:
    """`weighted_fid` when there are fewer samples than feature dimensions (e.g. 2048-d Inception).

    A resample's covariance has rank < n, and the nonzero eigenvalues of S_ref^1/2 S S_ref^1/2 are
    those of the n x n matrix D^1/2 Xc S_ref Xc' D^1/2 / (t - 1) (D = diag(w), Xc centred by the
    resample's mean), built from the Gram matrix G = X S_ref X' computed once: one small eigh per
    resample (rows with zero count dropped) instead of a d x d one."""
    g = x @ sigma_ref @ x.T
    sq = (x * x).sum(1)
    out = np.empty(len(w))
    for b, (wb, tb) in enumerate(zip(w, total, strict=True)):
        keep = wb > 0
        gk, wk = g[np.ix_(keep, keep)], wb[keep]
        gw = gk @ wk / tb
        m = gk - gw[:, None] - gw[None, :] + (wk @ gw) / tb
        root_w = np.sqrt(wk)
        eig = np.linalg.eigvalsh(root_w[:, None] * m * root_w[None, :] / (tb - 1))
        tr_cov = (wb @ sq - tb * mu[b] @ mu[b]) / (tb - 1)
        out[b] = ((mu[b] - mu_ref) ** 2).sum() + tr_cov + np.trace(sigma_ref) - 2 * np.sqrt(np.clip(eig, 0, None)).sum()
    return out


def _kid_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """torch-fidelity's KID kernel: (a.b / d + 1)^3."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def weighted_kid(x: np.ndarray, w: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 (cubic kernel) of each weighted multiset of `x` against the fixed rows `ref`."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    w = np.atleast_2d(w)
    total = w.sum(1)
    k_xx = _kid_kernel(x, x)
    m = len(ref)
    k_rr = _kid_kernel(ref, ref)
    rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    gg = (((w @ k_xx) * w).sum(1) - w @ np.diag(k_xx)) / (total * (total - 1))
    gr = (w @ _kid_kernel(x, ref).sum(1)) / (total * m)
    return gg + rr - 2 * gr


def weighted_is(logits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Inception Score exp(E KL(p(y|x) || p(y))) of each weighted multiset, on the full set (no splits)."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    p = np.exp(logp)
    w = np.atleast_2d(w)
    total = w.sum(1)
    py = (w @ p) / total[:, None]
    neg_entropy = (w @ (p * logp).sum(1)) / total
    return np.exp(neg_entropy - (py * np.log(np.clip(py, 1e-30, None))).sum(1))


def weighted_mean(v: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = np.atleast_2d(w)
    return (w @ np.asarray(v, np.float64)) / w.sum(1)


def metric_fn(sample: SampleSet, key: str) -> Callable[[np.ndarray], np.ndarray]:
    """w (B, n) -> the metric `key` of each weighted multiset of `sample`."""
    r = sample.reference
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "fid": lambda w: weighted_fid(sample.pooled, w, r["pooled_mu"], r["pooled_sigma"]),
        "sfid": lambda w: weighted_fid(sample.spatial, w, r["spatial_mu"], r["spatial_sigma"]),
        "kid": lambda w: weighted_kid(sample.pooled, w, r["kid_pooled"]),
        "is": lambda w: weighted_is(sample.logits, w),
        "psnr_vs_fp": lambda w: weighted_mean(sample.psnr, w),
        "class_accuracy": lambda w: weighted_mean(sample.correct, w),
        "confident_fraction": lambda w: weighted_mean(sample.confident, w),
    }
    if key not in fns:
        raise KeyError(f"no bootstrap for metric {key!r}; accepted: {sorted(fns)}")
    if key not in sample.available():
        raise KeyError(f"metric {key!r} needs {METRIC_INPUTS[key]} (and its reference), which this sample set lacks")
    return fns[key]


# -- intervals -------------------------------------------------------------------------------------
def bootstrap_statistics(sample: SampleSet, settings: Bootstrap = Bootstrap(),
                         metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{metric: (B,) statistic of each resample} for `metrics` (default: all the set can bootstrap).

    The counts depend only on (n, settings), so two runs with the same sample count and settings get
    the same resamples: their arrays can be subtracted for a paired test (`paired_from_statistics`)."""
    head = sample.head(settings.max_rows)
    w = settings.counts(len(sample))
    keys = head.available() if metrics is None else [k for k in metrics if k in head.available()]
    return {k: metric_fn(head, k)(w) for k in keys}


def interval(point: float, boot: np.ndarray, level: float, scale: float = 1.0) -> tuple[float, float]:
    """point + the central `level` range of the bootstrap deviations (times the m-out-of-n `scale`)."""
    dev = (np.asarray(boot) - np.mean(boot)) * scale
    lo, hi = np.quantile(dev, [(1 - level) / 2, (1 + level) / 2])
    return float(point + lo), float(point + hi)


def confidence_intervals(points: Mapping[str, float], boot: Mapping[str, np.ndarray], n: int,
                         settings: Bootstrap = Bootstrap()) -> dict[str, float]:
    """{<metric>_ci_lo, <metric>_ci_hi} for every metric with both a point value and a bootstrap array."""
    out: dict[str, float] = {}
    for key, values in boot.items():
        if key in points:
            out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = interval(float(points[key]), values, settings.level,
                                                                settings.scale(n))
    return out


@dataclass(frozen=True)
class Paired:
    """Paired bootstrap of mean(A) - mean(B) over runs sharing the eval noise."""

    diff: float  # observed difference of the (seed-averaged) statistics
    lo: float
    hi: float
    p_value: float  # two-sided, H0: no difference


def paired_from_statistics(points_a: Sequence[float], boot_a: Sequence[np.ndarray], points_b: Sequence[float],
                           boot_b: Sequence[np.ndarray], level: float = LEVEL, scale: float = 1.0) -> Paired:
    """The paired test from per-run points and bootstrap arrays computed on the same counts.

    Each side is the mean over its runs (e.g. seeds). The p-value is the share of centred bootstrap
    differences at least as far from 0 as the observed one, (1 + count) / (1 + B), never 0."""
    if not points_a or not points_b or len(points_a) != len(boot_a) or len(points_b) != len(boot_b):
        raise ValueError("paired test needs a point and a bootstrap array for at least one run per side")
    lengths = {len(v) for v in (*boot_a, *boot_b)}
    if len(lengths) != 1:
        raise ValueError(f"bootstrap arrays of different lengths {sorted(lengths)}: not the same resamples")
    diff = float(np.mean(points_a) - np.mean(points_b))
    boot = np.mean(boot_a, axis=0) - np.mean(boot_b, axis=0)
    lo, hi = interval(diff, boot, level, scale)
    centred = np.abs((boot - boot.mean()) * scale)
    p = (1 + int((centred >= abs(diff)).sum())) / (1 + len(boot))
    return Paired(diff, lo, hi, p)


def paired_bootstrap(a: Sequence[SampleSet], b: Sequence[SampleSet], key: str,
                     settings: Bootstrap = Bootstrap()) -> Paired:
    """Test metric `key` of runs `a` against runs `b` (e.g. the seeds of two methods) on shared noise:
    every run sees the same resampled sample indices; points are the full-set statistics."""
    if not a or not b:
        raise ValueError("paired_bootstrap needs at least one run on each side")
    sizes = {len(s) for s in (*a, *b)}
    if len(sizes) != 1:
        raise ValueError(f"paired runs must have the same samples (shared eval noise); got sizes {sorted(sizes)}")
    n = sizes.pop()
    full = np.ones((1, min(n, settings.max_rows)))

    def side(runs: Sequence[SampleSet]) -> tuple[list[float], list[np.ndarray]]:
        points = [float(metric_fn(s.head(settings.max_rows), key)(full)[0]) for s in runs]
        return points, [bootstrap_statistics(s, settings, [key])[key] for s in runs]

    return paired_from_statistics(*side(a), *side(b), settings.level, settings.scale(n))


# -- FID at n -> infinity --------------------------------------------------------------------------
def fid_infinity(x: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, points: int = 8, draws: int = 4,
                 smallest: float = 0.5, seed: int = 0) -> tuple[float, float]:
    """FID extrapolated to infinitely many samples (Chong & Forsyth, CVPR 2020): (intercept, slope).

    FID of subsets of N samples (drawn without replacement, `draws` per size, `points` sizes from
    `smallest * n` to n) is fit linearly in 1/N; the intercept is FID_inf. The bias of FID is about
    proportional to 1/N once N is well above the feature dimension, hence the sizes from n/2 up."""
    x = np.asarray(x, np.float64)
    n = len(x)
    sizes = np.unique(np.linspace(max(2, int(smallest * n)), n, points).round().astype(int))
    if len(sizes) < 2:
        raise ValueError(f"FID_inf needs at least two subset sizes; n={n} is too small")
    rng = np.random.default_rng(seed)
    rows, inv = [], []
    for size in sizes:
        for _ in range(1 if size == n else draws):
            w = np.zeros(n)
            w[rng.choice(n, size, replace=False)] = 1
            rows.append(w)
            inv.append(1.0 / size)
    fids = weighted_fid(x, np.stack(rows), mu_ref, sigma_ref)
    slope, intercept = np.polyfit(np.asarray(inv), fids, 1)
    return float(intercept), float(slope)
