"""The FP side of every comparison, computed once per sweep through the artifact cache.

Each artifact's key spells out what it depends on: the model (config and a fingerprint of its
weights), the sampler, and the sample counts and seeds. A method never changes these, so all runs of
a sweep (and later sweeps) share them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from harness import distributed
from harness.artifacts import ArtifactCache, tensors_fingerprint
from harness.calibration import CalibData, capture_calibration
from harness.config import RunConfig
from harness.datasets import load_mnist
from harness.metrics import reference_data
from harness.metrics.features import FeatureExtractor
from harness.metrics.fidelity import features_to_reference
from harness.metrics.temporal import capture_temporal_features
from harness.models.base import DiffusionModel
from harness.sampling import Samples

DATASETS = {"mnist": lambda: load_mnist()[0] * 2 - 1}


class References:
    """Lazy accessors for the shared FP artifacts of one (model, sampler, eval) setting."""

    def __init__(self, rc: RunConfig, model: DiffusionModel, cache: ArtifactCache) -> None:
        self.rc, self.model, self.cache = rc, model, cache
        self.model_key: dict[str, Any] = {
            "model": {k: v for k, v in rc.model.items() if k != "path"},
            "weights": tensors_fingerprint(model.net.state_dict()),
            **model.parts_key(),  # decoder weights, condition source (prompt file, text encoder); {} if none
        }
        self.sampler_key = asdict(rc.sampler)
        self.eval_key = {"n": rc.eval.n_samples, "seed": rc.eval.seed, "n_trajectory": rc.eval.n_trajectory}

    def calibration_trajectories(self, rows_per_step: int) -> int:
        """FP trajectories to capture: `calibration.n_samples`, or more when the method's recipe needs
        `rows_per_step` rows at one step (each trajectory gives one row per step, two with CFG)."""
        m = self.model
        per_trajectory = 2 if m.is_conditional and m.guidance_scale != 1.0 else 1  # both CFG branches
        return max(self.rc.calibration.n_samples, -(-rows_per_step // per_trajectory))

    def calibration(self, rows_per_step: int = 0) -> CalibData:
        """The shared calibration artifact, large enough for `rows_per_step` rows at every step."""
        c = self.rc.calibration
        n = self.calibration_trajectories(rows_per_step)
        deps = {**self.model_key, "sampler": self.sampler_key, "calibration": {**asdict(c), "n_samples": n}}
        tensors = self.cache.get_or_build(
            "calibration", deps,
            lambda: capture_calibration(self.model, self.rc.sampler, n, c.batch_size, c.seed).tensors(),
        )
        return CalibData.from_tensors(tensors)

    def fp_samples(self) -> Samples:
        """FP samples (and trajectories) for the eval seeds."""
        deps = {**self.model_key, "sampler": self.sampler_key, "eval": self.eval_key}

        def build() -> dict[str, torch.Tensor]:
            s = distributed.sample(self.model, self.rc.sampler, self.rc.eval.n_samples,
                                      self.rc.eval.batch_size, self.rc.eval.seed,
                                      n_trajectory=self.rc.eval.n_trajectory, desc="FP reference samples")
            out = {"images": s.images, "timesteps": torch.tensor(s.timesteps)}
            if s.trajectory is not None:
                out["trajectory"] = s.trajectory
            if s.conds is not None:
                out["conds"] = s.conds
            if s.latents is not None:
                out["latents"] = s.latents
            return out

        t = self.cache.get_or_build("fp_samples", deps, build)
        return Samples(t["images"], t.get("conds"), t["timesteps"].tolist(), t.get("trajectory"), t.get("latents"))

    def reference_kind(self) -> str:
        """Where quality metrics compare to: the dataset when the model has one, else FP samples."""
        ref = self.rc.eval.reference
        if ref == "auto":
            ref = "dataset" if self.model.dataset in DATASETS else "fp"
        if ref == "dataset" and self.model.dataset not in DATASETS:
            raise ValueError(f"<eval.reference=dataset> but model {self.model.name} has dataset="
                             f"{self.model.dataset!r}; datasets available offline: {sorted(DATASETS)}; "
                             "use eval.reference=fp")
        return ref

    def reference_statistics(self, extractor: FeatureExtractor, fp_samples: Samples) -> dict[str, torch.Tensor]:
        """Feature statistics of the reference set (cached per extractor)."""
        kind = self.reference_kind()
        if kind not in ("dataset", "fp"):  # the user's folder or npz (harness/metrics/reference_data.py)
            return reference_data.reference_statistics(kind, extractor, self.rc.eval.batch_size, self.cache)
        if kind == "dataset":
            deps = {"dataset": self.model.dataset, "extractor": extractor.describe()}
            images = DATASETS[str(self.model.dataset)]
        else:
            deps = {**self.model_key, "sampler": self.sampler_key, "eval": self.eval_key,
                    "extractor": extractor.describe()}
            images = lambda: fp_samples.images  # noqa: E731

        def build() -> dict[str, torch.Tensor]:
            feats = distributed.images_to_features(extractor, images(), self.rc.eval.batch_size,
                                                   desc=f"{kind} reference features")
            return features_to_reference(feats)

        return self.cache.get_or_build(f"reference_stats_{kind}", deps, build)

    def temporal_conditions(self) -> torch.Tensor | None:
        """Every label incl. the CFG null label for class-conditional models; the null condition otherwise."""
        if self.model.num_classes is not None:
            return torch.arange(self.model.num_classes + 1)
        return None

    def fp_temporal_features(self, timesteps: list[int]) -> dict[str, torch.Tensor]:
        deps = {**self.model_key, "timesteps": list(timesteps)}
        return self.cache.get_or_build(
            "fp_temporal_features", deps,
            lambda: capture_temporal_features(self.model, timesteps, self.temporal_conditions()),
        )
