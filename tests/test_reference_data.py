"""The user's reference data: a folder of images, an ADM reference-batch npz, an Inception-statistics npz."""

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.artifacts import ArtifactCache
from harness.config import RESIZE_MODES, EvalConfig
from harness.metrics.features import Features
from harness.metrics.fidelity import features_to_metrics, features_to_reference
from harness.metrics.inception import InceptionExtractor
from harness.metrics.lenet import LeNetExtractor
from harness.metrics.reference_data import (
    reference_format,
    reference_statistics,
    statistics_only_metrics,
)

torch.set_num_threads(1)


class CountingCache(ArtifactCache):
    """The real cache, counting how often a value had to be built."""

    n_built = 0

    def get_or_build(self, kind: str, deps: dict, build: Callable[[], dict]) -> dict:
        def counted() -> dict:
            self.n_built += 1
            return build()

        return super().get_or_build(kind, deps, counted)


def _digits(n: int = 6, size: int = 28, channels: int = 1) -> np.ndarray:
    """uint8 (n, H, W, C) images with some structure (a bright square at a random place)."""
    rng = np.random.default_rng(0)
    out = rng.integers(0, 40, (n, size, size, channels), dtype=np.uint8)
    for img in out:
        y, x = rng.integers(0, size // 2, 2)
        img[y : y + size // 3, x : x + size // 3] = 230
    return out


def _write_folder(root: Path, images: np.ndarray) -> Path:
    """PNGs (lossless, so comparable with the npz of the same pixels) in two nested sub-folders."""
    for i, img in enumerate(images):
        sub = root / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(sub / f"{i:03d}.png")
    return root


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


def test_folder_and_adm_npz_of_the_same_images_give_the_same_statistics(tmp_path: Path) -> None:
    images = _digits()
    folder = _write_folder(tmp_path / "real", images)
    npz = tmp_path / "VIRTUAL_ref.npz"
    np.savez(npz, arr_0=images)
    assert reference_format(folder) == "folder" and reference_format(npz) == "npz_images"
    cache, lenet = CountingCache(tmp_path / "cache"), LeNetExtractor()
    # the folder's sorted order is b/c/000, b/c/002, ... then a/001, ...: statistics do not depend on order
    from_folder = reference_statistics(folder, lenet, 4, cache)
    from_npz = reference_statistics(npz, lenet, 4, cache)
    assert int(from_folder["num_images"]) == 6 and cache.n_built == 2
    assert _equal({k: v for k, v in from_folder.items() if k != "kid_pooled"},
                  {k: v for k, v in from_npz.items() if k != "kid_pooled"})
    again = reference_statistics(folder, lenet, 4, cache)
    moved = shutil.copytree(folder, tmp_path / "moved")
    reference_statistics(moved, lenet, 4, cache)
    assert cache.n_built == 2 and _equal(again, from_folder), "built once; the key is the content, not the path"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(moved / "a" / "001.png")
    reference_statistics(moved, lenet, 4, cache)
    assert cache.n_built == 3, "an edited image is new content"


def test_folder_with_jpg_and_mixed_sizes(tmp_path: Path) -> None:
    images = _digits(4, size=16, channels=3)
    folder = _write_folder(tmp_path / "real", images)
    Image.fromarray(_digits(1, size=24, channels=3)[0]).save(folder / "a" / "big.JPG", quality=95)
    inception = InceptionExtractor(random_init=True, resize="clean")
    stats = reference_statistics(folder, inception, 8, ArtifactCache(tmp_path / "cache"))
    assert int(stats["num_images"]) == 5  # 4 PNG at 16 px + 1 JPEG at 24 px, batched per size
    assert stats["pooled_mu"].shape == (2048,) and stats["spatial_sigma"].shape == (2023, 2023)


def test_statistics_npz_is_checked_and_gives_fid_sfid_and_is(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mu, mu_s = rng.normal(size=2048), rng.normal(size=2023)
    npz = tmp_path / "fid_stats.npz"
    np.savez(npz, mu=mu, sigma=np.eye(2048), mu_s=mu_s, sigma_s=np.eye(2023))
    assert reference_format(npz) == "npz_stats"
    inception, cache = InceptionExtractor(random_init=True), CountingCache(tmp_path / "cache")
    stats = reference_statistics(npz, inception, 4, cache)
    reference_statistics(npz, inception, 4, cache)
    assert cache.n_built == 1 and set(stats) == {"pooled_mu", "pooled_sigma", "spatial_mu", "spatial_sigma"}
    assert np.array_equal(stats["pooled_mu"].numpy(), mu) and np.array_equal(stats["spatial_mu"].numpy(), mu_s)
    with pytest.raises(ValueError, match=r"holds precomputed Inception statistics only .* extractor must be "
                                         r"inception, got 'lenet'"):
        reference_statistics(npz, LeNetExtractor(), 4, cache)
    bad = tmp_path / "bad_dims.npz"
    np.savez(bad, mu=np.zeros(200), sigma=np.eye(200))
    with pytest.raises(ValueError, match=r"mu / sigma must be \(2048,\) / \(2048, 2048\)"):
        reference_statistics(bad, inception, 4, cache)


def test_statistics_only_metrics_match_the_full_reference() -> None:
    """Against mu/sigma alone FID and sFID equal what the full reference gives (small feature dims here:
    the Frechet distance of 2048-d Inception statistics takes minutes on 2 loaded cores)."""
    g = torch.Generator().manual_seed(0)
    real = Features(torch.randn(40, 8, generator=g), torch.randn(40, 6, generator=g), torch.randn(40, 10, generator=g))
    fake = Features(torch.randn(30, 8, generator=g) + 0.5, torch.randn(30, 6, generator=g),
                    torch.randn(30, 10, generator=g))
    full = features_to_reference(real)
    stats_only = {k: full[k] for k in ("pooled_mu", "pooled_sigma", "spatial_mu", "spatial_sigma")}
    out = statistics_only_metrics(fake, stats_only)
    expected = features_to_metrics(fake, full)
    assert set(out) == {"fid", "sfid", "is", "is_std"}
    assert out["fid"] == pytest.approx(expected["fid"]) and out["sfid"] == pytest.approx(expected["sfid"])
    assert out["is"] == pytest.approx(expected["is"])
    pooled_only = statistics_only_metrics(fake, {k: full[k] for k in ("pooled_mu", "pooled_sigma")})
    assert "sfid" not in pooled_only and pooled_only["fid"] == pytest.approx(expected["fid"])


def _eval_cfg(**over) -> dict:
    return {"name": "t", "n_samples": 8, "batch_size": 4, "seed": 0, "extractor": "inception", "reference": "auto",
            "n_trajectory": 0, "grid": 0, "latency": {"batch_sizes": [1], "warmup": 0, "iters": 1}, **over}


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_every_clean_fid_resize_mode_is_accepted_and_keys_the_cache(mode: str) -> None:
    assert EvalConfig.parse(_eval_cfg(resize=mode)).resize == mode
    assert InceptionExtractor(random_init=True, resize=mode).describe()["resize"] == mode


def test_bad_resize_mode_and_bad_reference_paths_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"<eval.resize=bicubic> must be one of legacy_tensorflow, clean, "
                                         r"legacy_pytorch"):
        EvalConfig.parse(_eval_cfg(resize="bicubic"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    np.savez(tmp_path / "other.npz", features=np.zeros(3))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    for path, message in [(tmp_path / "missing", "does not exist"),
                          (tmp_path / "empty", "a folder without .png/.jpg images"),
                          (tmp_path / "notes.txt", "neither a folder nor an .npz file"),
                          (tmp_path / "other.npz", r"holds \['features'\], neither arr_0 \(images\) nor mu/sigma"),
                          (tmp_path / "broken.npz", "is not a readable .npz")]:
        with pytest.raises(ValueError, match=f"{message}.*eval.reference accepts auto, dataset, fp, or a path"):
            EvalConfig.parse(_eval_cfg(reference=str(path)))
    np.savez(tmp_path / "ok.npz", arr_0=_digits(2))
    assert EvalConfig.parse(_eval_cfg(reference=str(tmp_path / "ok.npz"))).reference == str(tmp_path / "ok.npz")


def test_eval_reference_path_reaches_the_runs_reference_statistics(tmp_path: Path) -> None:
    """Wiring: eval.reference=/folder passes validation and References serves the folder's statistics
    (with the extractor a run would make), cached under the user-reference artifact."""
    from hydra import compose, initialize_config_dir

    from harness.evaluate import make_extractor
    from harness.models.zoo import load_model
    from harness.references import References
    from harness.runner import validate

    folder = _write_folder(tmp_path / "real", _digits(6))
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=ddpm_mnist", "eval=smoke", "logger=none", "eval.extractor=lenet", f"eval.reference={folder}",
            f"paths.artifacts={tmp_path / 'artifacts'}"])
    rc, _ = validate(cfg)
    model = load_model(rc.model)
    refs = References(rc, model, ArtifactCache(rc.paths["artifacts"]))
    extractor = make_extractor(rc, model)
    assert refs.reference_kind() == str(folder) and extractor.name == "lenet"
    stats = refs.reference_statistics(extractor, fp_samples=None)
    assert int(stats["num_images"]) == 6
    assert _equal(stats, reference_statistics(folder, LeNetExtractor(), 4, ArtifactCache(tmp_path / "other")))
    assert len(list((tmp_path / "artifacts" / "reference_stats_user").glob("*.safetensors"))) == 1
