"""All metrics of one run, computed from its samples and the shared FP references.

Quality (FID, sFID, KID, IS, class accuracy) is measured against the dataset when the model has one,
else against the FP samples; fidelity to FP (PSNR, trajectory error per step) uses the same eval
noise; temporal-feature error is measured on the quantized network itself (before the backend, since
it is a property of the quantization); latency and memory on the executable backend model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.utils import save_image

from harness import distributed
from harness.config import RunConfig
from harness.metrics.clip_score import clip_score, sample_prompts
from harness.metrics.features import FeatureExtractor, build_extractor
from harness.metrics.fidelity import (
    class_accuracy,
    features_to_metrics,
    sample_set,
    uncertainty_metrics,
)
from harness.metrics.latency import fp32_weight_bytes, measure_latency, weight_bytes
from harness.metrics.reference_data import statistics_only_metrics
from harness.metrics.temporal import (
    capture_temporal_features,
    per_image_psnr,
    psnr,
    temporal_feature_error,
    trajectory_error,
)
from harness.models.base import DiffusionModel
from harness.references import References
from harness.sampling import Samples


def make_extractor(rc: RunConfig, model: DiffusionModel) -> FeatureExtractor:
    """`auto`: LeNet-5 for MNIST models, InceptionV3 otherwise."""
    name = rc.eval.extractor
    if name == "auto":
        name = "lenet" if model.dataset == "mnist" else "inception"
    if name == "inception":
        return build_extractor("inception", weights=rc.eval.inception_weights, random_init=rc.eval.inception_random,
                               resize=rc.eval.resize)
    return build_extractor(name)


def quality_metrics(rc: RunConfig, refs: References, samples: Samples, fp_samples: Samples,
                    out_dir: Path | None = None) -> dict[str, float]:
    """Quality metrics with bootstrap CIs (and PSNR vs FP per image when the run is not FP itself);
    with `out_dir`, the per-sample quantities are kept there for paired tests between runs."""
    extractor = make_extractor(rc, refs.model)
    feats = distributed.images_to_features(extractor, samples.images, rc.eval.batch_size, desc="sample features")
    reference = refs.reference_statistics(extractor, fp_samples)
    if "kid_pooled" not in reference:  # the user's npz of Inception statistics: FID (sFID) and IS only
        return statistics_only_metrics(feats, reference, seed=rc.eval.seed)
    out = features_to_metrics(feats, reference, seed=rc.eval.seed)
    labels = None
    if refs.model.num_classes is not None and extractor.name == "lenet" and samples.conds is not None:
        labels = samples.conds
        out.update(class_accuracy(feats.logits, labels))
    elif extractor.name == "lenet":
        out["confident_fraction"] = class_accuracy(feats.logits, feats.logits.argmax(1))["confident_fraction"]
    each = None if samples is fp_samples else per_image_psnr(fp_samples.images, samples.images)
    if each is not None:
        out["psnr_vs_fp"] = float(each.mean())
    meta = {"eval_seed": rc.eval.seed, "sampler": f"{rc.sampler.name}/{rc.sampler.steps}", "extractor": extractor.name}
    out.update(uncertainty_metrics(sample_set(feats, reference, labels, each), out, save_to=out_dir, meta=meta))
    return out


def temporal_metrics(refs: References, qmodel: DiffusionModel, timesteps: list[int]) -> dict[str, Any]:
    conds = refs.temporal_conditions()
    fp = refs.fp_temporal_features(timesteps)
    q = capture_temporal_features(qmodel, timesteps, conds, names=list(fp))
    mean, per_block = temporal_feature_error(fp, q)
    return {"temporal_feature_error": mean, "temporal_feature_error_per_block": per_block}


def latency_metrics(rc: RunConfig, exe: DiffusionModel, qmodel: DiffusionModel, timestep: int) -> dict[str, Any]:
    lat = measure_latency(exe, list(rc.eval.latency_batch_sizes), rc.eval.latency_warmup, rc.eval.latency_iters,
                          timestep=timestep)
    out: dict[str, Any] = {"weight_bytes": weight_bytes(qmodel.net), "fp32_weight_bytes": fp32_weight_bytes(qmodel.net)}
    for row in lat["per_batch"]:
        b = row["batch_size"]
        out[f"latency_ms_b{b}"] = row["ms_per_call"]
        out[f"ms_per_image_b{b}"] = row["ms_per_image"]
        out[f"peak_memory_bytes_b{b}"] = row["peak_memory_bytes"]
    out["latency_ms"] = lat["per_batch"][0]["ms_per_call"]
    return out


def evaluate(rc: RunConfig, refs: References, qmodel: DiffusionModel, exe: DiffusionModel, samples: Samples,
             fp_samples: Samples, out_dir: Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scalar metrics, per-timestep curves) of one run; `out_dir` keeps its per-sample features."""
    metrics: dict[str, Any] = ({} if rc.eval.extractor == "none"
                               else quality_metrics(rc, refs, samples, fp_samples, out_dir))
    if samples is not fp_samples and "psnr_vs_fp" not in metrics:  # FP itself: PSNR would be inf
        metrics["psnr_vs_fp"] = psnr(fp_samples.images, samples.images)
    if rc.eval.clip_model:  # text-to-image: each decoded image against its prompt
        prompts = sample_prompts(getattr(refs.model, "conditions", None), samples.conds)
        metrics["clip_score"] = clip_score(samples.images, prompts, rc.eval.clip_model, rc.eval.batch_size)
    curves: dict[str, Any] = {"timesteps": samples.timesteps}
    if samples.trajectory is not None and fp_samples.trajectory is not None:
        curves["trajectory_error"] = trajectory_error(fp_samples.trajectory, samples.trajectory)
        metrics["trajectory_error_final"] = curves["trajectory_error"][-1]
    if rc.eval.temporal:
        curves.update(temporal_metrics(refs, qmodel, samples.timesteps))
        tfe = curves["temporal_feature_error"]
        metrics["temporal_feature_error_mean"] = sum(tfe) / len(tfe)
    metrics.update(latency_metrics(rc, exe, qmodel, samples.timesteps[len(samples.timesteps) // 2]))
    return metrics, curves


def save_grid(images: torch.Tensor, path: Path) -> Path:
    """A PNG grid of samples in [-1, 1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, int(len(images) ** 0.5))
    save_image((images.float() + 1) / 2, str(path), nrow=nrow, padding=1)
    return path
