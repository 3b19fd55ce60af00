"""Reference data the user brings (`eval.reference=/path`): the real side of FID / sFID / KID.

Accepted, so a paper's protocol can be followed with the data that paper used:
- a folder of real images (.png / .jpg / .jpeg, nested folders allowed), e.g. LSUN or COCO images;
- an `.npz` of reference images in the guided-diffusion / ADM reference-batch format: `arr_0`
  uint8 (N, H, W, C) (its `mu` / `sigma` / `mu_s` / `sigma_s`, when present, are ignored: the
  statistics are recomputed from the images with this run's extractor and resize mode, so both
  sides of the comparison went through the same network and preprocessing);
- an `.npz` of precomputed Inception statistics only: `mu` / `sigma` (pool_3, 2048-d) and optionally
  `mu_s` / `sigma_s` (the ADM evaluator's spatial features, 2023-d, for sFID), as clean-fid and the
  ADM evaluator write them. Only FID (and sFID) can be computed against these, and only with the
  Inception extractor (other feature spaces have other statistics).

Statistics are built once and cached (`ArtifactCache`), keyed by a sha256 of the content (every
image file's bytes and relative path, or the npz's bytes) plus the extractor's description, which
includes its resize mode: moving or renaming the folder reuses the cache, editing one image does not.
Resizing to the extractor's input follows clean-fid's modes (`eval.resize`, see inception.py); it is
the extractor's, so generated and reference images are resized alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.artifacts import ArtifactCache
from harness.metrics.features import FeatureExtractor, Features
from harness.metrics.fidelity import (
    IS_SPLITS,
    features_to_reference,
    features_to_statistics,
    logits_to_is,
    statistics_to_fid,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INCEPTION_DIMS = {"pooled": 2048, "spatial": 2023}  # pool_3; mixed_6/conv[:7] at 17 x 17 (ADM's sFID)
ACCEPTED = ("eval.reference accepts auto, dataset, fp, or a path to: a folder of real images (.png/.jpg, "
            "nested allowed); an .npz of reference images (arr_0 uint8 N x H x W x C, the guided-diffusion / "
            "ADM reference-batch format); an .npz of Inception statistics (mu, sigma; optional mu_s, sigma_s)")


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, in a stable (sorted relative path) order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files)
    except (OSError, ValueError) as err:
        raise ValueError(f"<eval.reference={path}> is not a readable .npz ({err}); {ACCEPTED}") from err


def reference_format(path: str | Path) -> str:
    """`folder`, `npz_images` or `npz_stats`; a clear error for anything else (checked at validation)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not image_files(p):
            raise ValueError(f"<eval.reference={path}> is a folder without .png/.jpg images; {ACCEPTED}")
        return "folder"
    if not p.is_file():
        raise ValueError(f"<eval.reference={path}> does not exist; {ACCEPTED}")
    if p.suffix.lower() != ".npz":
        raise ValueError(f"<eval.reference={path}> is neither a folder nor an .npz file; {ACCEPTED}")
    keys = _npz_keys(p)
    if "arr_0" in keys:
        return "npz_images"
    if {"mu", "sigma"} <= set(keys):
        return "npz_stats"
    raise ValueError(f"<eval.reference={path}> holds {keys}, neither arr_0 (images) nor mu/sigma (statistics); "
                     f"{ACCEPTED}")


def content_digest(path: str | Path) -> str:
    """sha256 of the reference's content: the npz bytes, or every image's relative path and bytes."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    files = image_files(p) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p)).encode() if p.is_dir() else b"npz")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _to_float(batch: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1] (exactly invertible by features.to_uint8)."""
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def _read_image(path: Path) -> np.ndarray:
    """(H, W, C) uint8: grayscale stays one channel, everything else becomes RGB (as clean-fid reads)."""
    with Image.open(path) as img:
        img = img.convert("L" if img.mode in ("L", "1", "I;16") else "RGB")
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def folder_batches(folder: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of the folder's images; a batch is cut where the image size changes (no resize here)."""
    pending: list[np.ndarray] = []
    for f in image_files(folder):
        arr = _read_image(f)
        if pending and (len(pending) == batch_size or arr.shape != pending[0].shape):
            yield _to_float(np.stack(pending))
            pending = []
        pending.append(arr)
    if pending:
        yield _to_float(np.stack(pending))


def npz_batches(path: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of an ADM reference batch's `arr_0` (uint8, N x H x W x C)."""
    with np.load(path, allow_pickle=False) as data:
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"<eval.reference={path}>: arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, got "
                         f"{images.dtype} {images.shape}; {ACCEPTED}")
    for s in range(0, len(images), batch_size):
        yield _to_float(images[s : s + batch_size])


def npz_statistics(path: Path, extractor: FeatureExtractor) -> dict[str, torch.Tensor]:
    """mu / sigma (and mu_s / sigma_s) of a statistics npz, checked against the Inception extractor."""
    if extractor.name != "inception":
        raise ValueError(f"<eval.reference={path}> holds precomputed Inception statistics only (mu/sigma), so the "
                         f"extractor must be inception, got {extractor.name!r}: set eval.extractor=inception, or "
                         "give a folder of images or an npz with arr_0 images for another feature space")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in data}
    out: dict[str, torch.Tensor] = {}
    for view, (mu, sigma) in {"pooled": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
        if mu not in arrays:
            continue
        d = INCEPTION_DIMS[view]
        if arrays[mu].shape != (d,) or arrays.get(sigma, np.empty(0)).shape != (d, d):
            raise ValueError(f"<eval.reference={path}>: {mu} / {sigma} must be ({d},) / ({d}, {d}) Inception "
                             f"statistics, got {arrays[mu].shape} / {arrays.get(sigma, np.empty(0)).shape}")
        out[f"{view}_mu"], out[f"{view}_sigma"] = torch.from_numpy(arrays[mu]), torch.from_numpy(arrays[sigma])
    return out


def reference_statistics(path: str | Path, extractor: FeatureExtractor, batch_size: int,
                         cache: ArtifactCache) -> dict[str, torch.Tensor]:
    """The reference side of the quality metrics for a user path, built once per (content, extractor)."""
    p = Path(path).expanduser()
    kind = reference_format(p)
    deps: dict[str, Any] = {"reference_sha256": content_digest(p), "format": kind, "extractor": extractor.describe()}

    def build() -> dict[str, torch.Tensor]:
        if kind == "npz_stats":
            return npz_statistics(p, extractor)
        batches = folder_batches(p, batch_size) if kind == "folder" else npz_batches(p, batch_size)
        parts = []
        for batch in batches:
            with torch.no_grad():
                parts.append(extractor.extract_batch(batch.to(extractor.device)))
        return features_to_reference(Features.cat(parts))

    return cache.get_or_build("reference_stats_user", deps, build)


def statistics_only_metrics(feats: Features, reference: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """What a statistics-only reference allows: FID, sFID when mu_s / sigma_s exist, and IS (no reference)."""
    out = {"fid": statistics_to_fid(features_to_statistics(feats.pooled),
                                    {"mu": reference["pooled_mu"], "sigma": reference["pooled_sigma"]})}
    if "spatial_mu" in reference:
        out["sfid"] = statistics_to_fid(features_to_statistics(feats.spatial),
                                        {"mu": reference["spatial_mu"], "sigma": reference["spatial_sigma"]})
    out["is"], out["is_std"] = logits_to_is(feats.logits, min(IS_SPLITS, len(feats)), seed)
    return out
