"""Bootstrap CIs, paired tests and FID_inf on synthetic features whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from harness.metrics import fidelity as F
from harness.metrics import uncertainty as U

torch.set_num_threads(1)


def _gauss(rng: np.random.Generator, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    return rng.normal(size=(n, d)) * scale + shift


def _reference(ref: np.ndarray) -> dict[str, np.ndarray]:
    return {"pooled_mu": ref.mean(0), "pooled_sigma": np.cov(ref, rowvar=False), "kid_pooled": ref[:400]}


def _gaussian_fid(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))


def test_unit_weights_reproduce_the_point_metrics() -> None:
    rng = np.random.default_rng(0)
    x, ref = _gauss(rng, 300, 12, 0.3), _gauss(rng, 500, 12)
    r = _reference(ref)
    ones = np.ones((1, len(x)))
    fid = F.statistics_to_fid(F.features_to_statistics(torch.from_numpy(x)),
                              {"mu": torch.from_numpy(r["pooled_mu"]), "sigma": torch.from_numpy(r["pooled_sigma"])})
    assert U.weighted_fid(x, ones, r["pooled_mu"], r["pooled_sigma"])[0] == pytest.approx(fid, rel=1e-8)
    kid, _ = F.features_to_kid(torch.from_numpy(x).float(), torch.from_numpy(ref[:300]).float(), subsets=2,
                               subset_size=300)
    assert U.weighted_kid(x, ones, ref[:300])[0] == pytest.approx(kid, rel=1e-3)
    logits = rng.normal(size=(300, 10)) * 2
    is_split, _ = F.logits_to_is(torch.from_numpy(logits), splits=1)
    assert U.weighted_is(logits, ones)[0] == pytest.approx(is_split, rel=1e-6)


def test_counts_reweight_like_repeated_rows() -> None:
    """A resample's weighted statistics equal those of the explicitly repeated rows."""
    rng = np.random.default_rng(1)
    x, ref = _gauss(rng, 40, 5), _gauss(rng, 100, 5, 0.2)
    r = _reference(ref)
    w = U.Bootstrap(resamples=10, seed=3).counts(40)
    rows = np.repeat(np.arange(40), w[0].astype(int))
    explicit = _gaussian_fid(x[rows].mean(0), np.cov(x[rows], rowvar=False), r["pooled_mu"], r["pooled_sigma"])
    assert U.weighted_fid(x, w[:1], r["pooled_mu"], r["pooled_sigma"])[0] == pytest.approx(explicit, rel=1e-8)
    assert U.weighted_mean(x[:, 0], w[:1])[0] == pytest.approx(x[rows, 0].mean())


def _coverage(trials: int, draw, point, key: str, settings: U.Bootstrap, truth: float) -> float:
    hits = 0
    for i in range(trials):
        sample = draw(np.random.default_rng(100 + i))
        boot = U.bootstrap_statistics(sample, settings, [key])
        lo, hi = U.confidence_intervals({key: point(sample)}, boot, len(sample), settings).values()
        hits += lo <= truth <= hi
    return hits / trials


def test_ci_covers_a_known_accuracy_and_mean_at_the_nominal_rate() -> None:
    settings = U.Bootstrap(resamples=200, level=0.9)
    p = 0.8

    def draw(rng: np.random.Generator) -> U.SampleSet:
        return U.SampleSet(correct=(rng.random(150) < p).astype(float), psnr=rng.normal(20.0, 3.0, 150))

    acc = _coverage(200, draw, lambda s: s.correct.mean(), "class_accuracy", settings, p)
    psnr = _coverage(200, draw, lambda s: s.psnr.mean(), "psnr_vs_fp", settings, 20.0)
    # 200 trials: the binomial sd of a 0.9 coverage is 0.021; the percentile bootstrap runs a little short
    assert 0.82 <= acc <= 0.97 and 0.82 <= psnr <= 0.97, (acc, psnr)


def test_fid_ci_covers_the_expected_fid_at_that_n() -> None:
    """FID is biased at finite n; its interval must cover E[FID_n] (the value a rerun would scatter
    around), estimated here by the mean over the independent trials themselves."""
    settings = U.Bootstrap(resamples=150, level=0.9)
    rng0 = np.random.default_rng(7)
    ref = _gauss(rng0, 4000, 4, 0.0)
    r = _reference(ref)

    def draw(rng: np.random.Generator) -> U.SampleSet:
        return U.SampleSet(pooled=_gauss(rng, 200, 4, 0.25, 1.1), reference=r)

    trials = [draw(np.random.default_rng(100 + i)) for i in range(120)]
    points = [float(U.weighted_fid(s.pooled, np.ones((1, 200)), r["pooled_mu"], r["pooled_sigma"])[0])
              for s in trials]
    expected = float(np.mean(points))
    hits = 0
    for s, pt in zip(trials, points, strict=True):
        boot = U.bootstrap_statistics(s, settings, ["fid"])
        lo, hi = U.confidence_intervals({"fid": pt}, boot, 200, settings).values()
        hits += lo <= expected <= hi
    assert 0.8 <= hits / len(trials) <= 0.98, hits / len(trials)


def test_fid_infinity_removes_most_of_the_small_n_bias() -> None:
    rng = np.random.default_rng(3)
    d = 30
    ref = _gauss(rng, 20000, d)
    r = _reference(ref)
    truth = _gaussian_fid(np.full(d, 0.1), np.eye(d) * 1.44, r["pooled_mu"], r["pooled_sigma"])
    errs_n, errs_inf = [], []
    for seed in range(4):
        x = _gauss(np.random.default_rng(seed), 600, d, 0.1, 1.2)
        fid_n = U.weighted_fid(x, np.ones((1, 600)), r["pooled_mu"], r["pooled_sigma"])[0]
        fid_inf, slope = U.fid_infinity(x, r["pooled_mu"], r["pooled_sigma"], seed=seed)
        assert slope > 0, "FID falls with more samples"
        errs_n.append(fid_n - truth)
        errs_inf.append(fid_inf - truth)
    assert np.mean(errs_n) > 0.5, "the setting has a visible small-n bias"
    assert abs(np.mean(errs_inf)) < 0.3 * np.mean(errs_n), (np.mean(errs_inf), np.mean(errs_n))


def test_paired_test_sees_a_small_shift_that_unpaired_intervals_miss() -> None:
    rng = np.random.default_rng(5)
    ref = _gauss(rng, 3000, 6)
    r = _reference(ref)
    base = _gauss(rng, 400, 6, 0.3)
    a = U.SampleSet(pooled=base, reference=r)
    b = U.SampleSet(pooled=base + 0.04 + rng.normal(size=base.shape) * 0.01, reference=r)  # same noise, shifted
    settings = U.Bootstrap(resamples=200)
    res = U.paired_bootstrap([b], [a], "fid", settings)
    assert res.diff > 0 and res.p_value < 0.01 and res.lo > 0
    ci = U.confidence_intervals({"fid": 0.0}, U.bootstrap_statistics(a, settings, ["fid"]), 400, settings)
    width = ci["fid_ci_hi"] - ci["fid_ci_lo"]
    assert res.diff < width / 2, "the shift is inside the unpaired interval: only pairing resolves it"
    same = U.paired_bootstrap([a], [a], "fid", settings)
    assert same.diff == 0 and same.p_value == 1.0


def test_paired_test_on_a_constructed_tie_is_not_significant() -> None:
    settings = U.Bootstrap(resamples=200)
    significant = 0
    for i in range(20):
        g = np.random.default_rng(i)
        a = U.SampleSet(psnr=g.normal(20, 2, 300))
        b = U.SampleSet(psnr=g.normal(20, 2, 300))
        significant += U.paired_bootstrap([a], [b], "psnr_vs_fp", settings).p_value < 0.05
    assert significant <= 4, f"{significant}/20 false positives at alpha 0.05"


def test_seed_averaged_sides_and_size_checks() -> None:
    g = np.random.default_rng(2)
    runs = [U.SampleSet(psnr=g.normal(20 + k, 1, 100)) for k in range(3)]
    res = U.paired_bootstrap(runs[:2], runs[2:], "psnr_vs_fp")
    assert res.diff == pytest.approx(np.mean([runs[0].psnr.mean(), runs[1].psnr.mean()]) - runs[2].psnr.mean())
    with pytest.raises(ValueError, match="same samples"):
        U.paired_bootstrap([runs[0]], [U.SampleSet(psnr=np.ones(50))], "psnr_vs_fp")
    with pytest.raises(KeyError, match="lacks"):
        U.metric_fn(runs[0], "fid")


def test_m_out_of_n_scaling_keeps_the_width() -> None:
    g = np.random.default_rng(4)
    s = U.SampleSet(psnr=g.normal(0, 1, 4000))
    full = U.Bootstrap(resamples=400, max_rows=4000)
    capped = U.Bootstrap(resamples=400, max_rows=1000)

    def width(settings: U.Bootstrap) -> float:
        ci = U.confidence_intervals({"psnr_vs_fp": 0}, U.bootstrap_statistics(s, settings), 4000, settings)
        return ci["psnr_vs_fp_ci_hi"] - ci["psnr_vs_fp_ci_lo"]

    assert width(capped) == pytest.approx(width(full), rel=0.25)


def test_uncertainty_metrics_write_and_read_back(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    feats = F.Features(torch.randn(60, 8, generator=g), torch.randn(60, 5, generator=g),
                       torch.randn(60, 10, generator=g))
    reference = F.features_to_reference(F.Features(torch.randn(200, 8, generator=g), torch.randn(200, 5, generator=g),
                                                   torch.randn(200, 10, generator=g)))
    points = F.features_to_metrics(feats, reference, kid_subset_size=60)
    labels = torch.randint(0, 10, (60,), generator=g)
    points.update(F.class_accuracy(feats.logits, labels))
    sample = F.sample_set(feats, reference, labels, psnr=torch.full((60,), 25.0))
    points["psnr_vs_fp"] = 25.0
    out = F.uncertainty_metrics(sample, points, U.Bootstrap(resamples=50), save_to=tmp_path, meta={"eval_seed": 0})
    for key in ("fid", "sfid", "kid", "is", "class_accuracy", "confident_fraction", "psnr_vs_fp"):
        assert out[f"{key}_ci_lo"] <= points[key] <= out[f"{key}_ci_hi"], key
    assert out["ci_level"] == 0.95 and out["ci_resamples"] == 50 and np.isfinite(out["fid_inf"])
    meta, boot = U.read_bootstrap(tmp_path / U.FEATURES_FILE)
    assert meta["eval_seed"] == "0" and meta["n"] == "60" and set(boot) >= {"fid", "kid", "psnr_vs_fp"}
    back = U.SampleSet.load(tmp_path / U.FEATURES_FILE)
    assert len(back) == 60 and set(back.available()) == set(sample.available())
    assert np.allclose(back.pooled, feats.pooled.numpy(), atol=1e-6)


def test_weighted_fid_with_fewer_samples_than_dimensions_matches_sqrtm() -> None:
    """The n < d path (Gram matrix, small eigh per resample; 2048-d Inception at small n) gives the
    FID that scipy's sqrtm gives on each resample's d x d covariance."""
    from scipy.linalg import sqrtm

    from harness.metrics.uncertainty import Bootstrap, weighted_fid

    rng = np.random.default_rng(3)
    n, d = 9, 120
    x = rng.normal(size=(n, d))
    ref = rng.normal(size=(500, d)) * 1.3 + 0.2
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    w = Bootstrap(resamples=10).counts(n)
    expected = []
    for wb in w:
        t = wb.sum()
        m = wb @ x / t
        cov = ((x - m).T * wb) @ (x - m) / (t - 1)
        expected.append(((m - mu) ** 2).sum() + np.trace(cov) + np.trace(sigma)
                        - 2 * np.trace(sqrtm(sigma @ cov)).real)
    np.testing.assert_allclose(weighted_fid(x, w, mu, sigma), expected, rtol=1e-6)
