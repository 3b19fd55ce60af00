"""FID / sFID / KID / IS numerics: agreement with independent computations and their invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy import linalg

from harness.metrics import fidelity as F
from harness.metrics.features import Features

torch.set_num_threads(1)


def gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    return torch.randn(n, d, generator=g) @ mix + shift


def direct_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook formula with scipy's matrix square root, independent of both libraries."""
    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def direct_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel on the full sets."""
    x, y = x.double(), y.double()
    d, m = x.shape[1], x.shape[0]
    k = lambda u, v: (u @ v.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: (kk.sum() - kk.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


@pytest.mark.parametrize("backend", ["torch-fidelity", "clean-fid"])
def test_fid_matches_direct_computation(backend: str) -> None:
    a, b = gaussian_features(300, 16, 0), gaussian_features(400, 16, 1, shift=0.3)
    ours = F.features_to_fid(a, b, backend)
    assert ours == pytest.approx(direct_fid(a, b), rel=1e-6)
    assert ours > 1.0


def test_fid_of_a_set_against_itself_is_zero() -> None:
    a = gaussian_features(500, 32, 2)
    assert abs(F.features_to_fid(a, a)) < 1e-6
    assert F.features_to_fid(a, gaussian_features(500, 32, 3)) > 1e-3


@pytest.mark.parametrize("backend", ["torch-fidelity", "clean-fid"])
def test_kid_matches_direct_mmd_on_full_sets(backend: str) -> None:
    # with the subset size equal to both set sizes every subset is the whole set (a permutation)
    x, y = gaussian_features(120, 8, 4), gaussian_features(120, 8, 5, shift=0.5)
    kid, _ = F.features_to_kid(x, y, subsets=3, subset_size=120, backend=backend)
    assert kid == pytest.approx(direct_kid(x, y), rel=1e-4)
    assert kid > 0.01


def test_kid_near_zero_for_one_distribution_and_subset_shrinks() -> None:
    pool = gaussian_features(350, 8, 6)  # one distribution, two disjoint draws
    same, std = F.features_to_kid(pool[:200], pool[200:], subsets=20)
    shifted, _ = F.features_to_kid(pool[:200], pool[200:] + 1.0, subsets=20)
    assert abs(same) < 3 * std + 1e-3
    assert shifted > 20 * (abs(same) + std)


@pytest.mark.parametrize("k", [3, 7, 10])
def test_is_of_confident_one_hot_logits_is_number_of_classes(k: int) -> None:
    logits = 50 * torch.nn.functional.one_hot(torch.arange(500 * k) % k, k).float()
    assert F.logits_to_is(logits, splits=1)[0] == pytest.approx(k, rel=1e-6)
    assert F.logits_to_is(logits, splits=10)[0] == pytest.approx(k, rel=0.05)  # shuffled splits: near-balanced
    assert F.logits_to_is(torch.zeros(50, k), splits=1)[0] == pytest.approx(1.0)


def test_class_accuracy_and_confidence() -> None:
    labels = torch.arange(100) % 10
    sure = 20 * torch.nn.functional.one_hot(labels, 10).float()
    assert F.class_accuracy(sure, labels) == {"class_accuracy": 1.0, "confident_fraction": 1.0}
    wrong = F.class_accuracy(sure, (labels + 1) % 10)
    assert wrong["class_accuracy"] == 0.0 and wrong["confident_fraction"] == 1.0
    assert F.class_accuracy(torch.zeros(100, 10), labels)["confident_fraction"] == 0.0
    with pytest.raises(ValueError, match="labels"):
        F.class_accuracy(sure, labels[:5])


def _features(n: int, seed: int, shift: float = 0.0) -> Features:
    g = torch.Generator().manual_seed(seed + 100)
    return Features(gaussian_features(n, 12, seed, shift), gaussian_features(n, 20, seed + 50, shift),
                    torch.randn(n, 10, generator=g) * 3)


def test_reference_roundtrips_through_safetensors_and_matches_direct(tmp_path) -> None:
    real, gen = _features(400, 10), _features(200, 11, shift=0.2)
    ref = F.features_to_reference(real, kid_rows=300)
    assert ref["kid_pooled"].shape == (300, 12) and int(ref["num_images"]) == 400
    save_file(ref, tmp_path / "ref.safetensors")
    loaded = load_file(tmp_path / "ref.safetensors")
    m = F.features_to_metrics(gen, loaded, kid_subsets=5, kid_subset_size=100)
    assert m == F.features_to_metrics(gen, ref, kid_subsets=5, kid_subset_size=100)
    assert m["fid"] == pytest.approx(direct_fid(gen.pooled, real.pooled), rel=1e-6)
    assert m["sfid"] == pytest.approx(direct_fid(gen.spatial, real.spatial), rel=1e-6)
    assert set(m) == {"fid", "sfid", "kid", "kid_std", "is", "is_std"}
    with pytest.raises(KeyError, match="kid_pooled"):
        F.features_to_metrics(gen, {k: v for k, v in ref.items() if k != "kid_pooled"})


def test_unknown_backend_is_named() -> None:
    a = gaussian_features(10, 3, 0)
    with pytest.raises(ValueError, match="clean-fid"):
        F.features_to_fid(a, a, backend="tf")  # type: ignore[arg-type]
