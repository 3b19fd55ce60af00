"""The Inception path end to end with a randomly initialised torch-fidelity network (no weights offline)."""

from __future__ import annotations

import pytest
import torch

from harness.metrics import fidelity as F
from harness.metrics.features import Features, build_extractor, images_to_features
from harness.metrics.inception import (
    PYTORCH_FID_WEIGHTS_FILE,
    WEIGHTS_FILE,
    InceptionExtractor,
    resolve_weights,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def random_inception() -> InceptionExtractor:
    return InceptionExtractor(random_init=True, seed=0)


def images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def gray_features(random_inception) -> tuple[torch.Tensor, Features]:
    x = images(2, 1, 28, 0)  # grayscale MNIST-sized, replicated to RGB and resized to 299 inside
    return x, images_to_features(random_inception, x, batch_size=2, progress=False)


def test_features_shapes_and_batch_invariance(random_inception, gray_features) -> None:
    x, a = gray_features
    b = images_to_features(random_inception, x, batch_size=1, progress=False)
    assert a.pooled.shape == (2, 2048) and a.spatial.shape == (2, 7 * 17 * 17) and a.logits.shape == (2, 1008)
    for key in ("pooled", "spatial", "logits"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-4, atol=1e-5)
    assert a.pooled.std(dim=0).mean() > 1e-4  # the random init keeps features alive (not ~1e-8)
    assert not torch.allclose(a.pooled[0], a.pooled[1])


def test_kid_and_is_end_to_end(random_inception, gray_features) -> None:
    x, real = gray_features
    shifted = images_to_features(random_inception, x.clamp(0, 1), progress=False)
    kid_same, _ = F.features_to_kid(real.pooled, real.pooled, subsets=2)
    kid_shift, _ = F.features_to_kid(shifted.pooled, real.pooled, subsets=2)
    assert kid_same <= 0 < kid_shift  # the unbiased estimate of a set against itself is <= 0
    is_mean, _ = F.logits_to_is(real.logits, splits=1)
    assert 1.0 < is_mean <= 2.0  # at most the number of images in the split


def test_weights_file_is_loaded_with_weights_only(random_inception, gray_features, tmp_path) -> None:
    path = tmp_path / WEIGHTS_FILE
    torch.save(random_inception.net.state_dict(), path)
    loaded = InceptionExtractor(weights=path)
    assert loaded.describe()["weights_sha256"] != random_inception.describe()["weights_sha256"]
    x, feats = gray_features
    torch.testing.assert_close(loaded.extract_batch(x[:1]).pooled, feats.pooled[:1], rtol=1e-4, atol=1e-5)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an InceptionV3 FID state dict"):
        InceptionExtractor(weights=tmp_path / "bad.pth")


def test_missing_weights_say_which_file_goes_where(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / WEIGHTS_FILE
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights(None, download=False)
    assert str(target) in str(err.value) and "eval.inception_weights" in str(err.value)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights=/nope"):
        build_extractor("inception", weights="/nope/w.pth")
    target.parent.mkdir(parents=True)
    (target.parent / PYTORCH_FID_WEIGHTS_FILE).write_bytes(b"x")
    assert resolve_weights(None, download=False).name == PYTORCH_FID_WEIGHTS_FILE
    target.write_bytes(b"x")
    assert resolve_weights(None, download=False) == target  # torch-fidelity's own file first


def test_clean_fid_resize_modes(random_inception, gray_features, monkeypatch) -> None:
    x, legacy = gray_features
    monkeypatch.setattr(random_inception, "resize", "clean")  # same network, clean-fid's PIL bicubic resize
    clean = random_inception.extract_batch(x[:1])
    assert clean.pooled.shape == (1, 2048) and torch.isfinite(clean.pooled).all()
    assert not torch.allclose(clean.pooled, legacy.pooled[:1])
    with pytest.raises(ValueError, match="legacy_tensorflow"):
        InceptionExtractor(random_init=True, resize="bicubic")  # type: ignore[arg-type]


@pytest.mark.slow
def test_full_metrics_end_to_end(random_inception) -> None:
    """FID / sFID in 2048 / 2023 dimensions: minutes of eigen-decomposition on a 2-core machine."""
    ref = F.reference_features(random_inception, images(12, 3, 32, 5), progress=False)
    m_same = F.features_to_metrics(images_to_features(random_inception, images(12, 3, 32, 5), progress=False),
                                   ref, kid_subsets=3, is_splits=2)
    m_other = F.features_to_metrics(images_to_features(random_inception, images(12, 3, 32, 6).clamp(0, 1),
                                                       progress=False), ref, kid_subsets=3, is_splits=2)
    assert abs(m_same["fid"]) < 1e-3 and abs(m_same["sfid"]) < 1e-3
    assert m_other["fid"] > 1e-3 and m_other["sfid"] > 1e-3
