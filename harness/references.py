"""The FP side of every comparison, computed once per sweep through the artifact cache.

Each artifact's key spells out what it depends on: the model (config and a fingerprint of its
weights), the sampler, and the sample counts and seeds. A method never changes these, so all runs of
a sweep (and later sweeps) share them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from harness.artifacts import ArtifactCache, tensors_fingerprint
from harness.calibration import CalibData, capture_calibration
from harness.config import RunConfig
from harness.models.base import DiffusionModel
from harness.sampling import Samples, sample


class References:
    """Lazy accessors for the shared FP artifacts of one (model, sampler, eval) setting."""

    def __init__(self, rc: RunConfig, model: DiffusionModel, cache: ArtifactCache) -> None:
        self.rc, self.model, self.cache = rc, model, cache
        self.model_key: dict[str, Any] = {
            "model": {k: v for k, v in rc.model.items() if k != "path"},
            "weights": tensors_fingerprint(model.net.state_dict()),
        }
        self.sampler_key = asdict(rc.sampler)
        self.eval_key = {"n": rc.eval.n_samples, "seed": rc.eval.seed, "n_trajectory": rc.eval.n_trajectory}

    def calibration(self) -> CalibData:
        c = self.rc.calibration
        deps = {**self.model_key, "sampler": self.sampler_key, "calibration": asdict(c)}
        tensors = self.cache.get_or_build(
            "calibration", deps,
            lambda: capture_calibration(self.model, self.rc.sampler, c.n_samples, c.batch_size, c.seed).tensors(),
        )
        return CalibData.from_tensors(tensors)

    def fp_samples(self, precomputed: Samples | None = None) -> Samples:
        """FP samples (and trajectories) for the eval seeds; `precomputed` seeds the cache (fp runs)."""
        deps = {**self.model_key, "sampler": self.sampler_key, "eval": self.eval_key}

        def build() -> dict[str, torch.Tensor]:
            s = precomputed or sample(self.model, self.rc.sampler, self.rc.eval.n_samples,
                                      self.rc.eval.batch_size, self.rc.eval.seed,
                                      n_trajectory=self.rc.eval.n_trajectory, desc="FP reference samples")
            out = {"images": s.images, "timesteps": torch.tensor(s.timesteps)}
            if s.trajectory is not None:
                out["trajectory"] = s.trajectory
            if s.conds is not None:
                out["conds"] = s.conds
            return out

        t = self.cache.get_or_build("fp_samples", deps, build)
        return Samples(t["images"], t.get("conds"), t["timesteps"].tolist(), t.get("trajectory"))
