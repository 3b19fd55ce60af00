"""The Method contract: quantize(model, calibration data, spec) -> quantized model + report.

Every PTQ method is one file in methods/, registered under the name of its config
(conf/method/<name>.yaml). It receives the FP `DiffusionModel` and must not modify it: it quantizes a
deep copy and returns it (same model facts, quantized network) with a `MethodReport`.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from harness.registry import Registry
from methods.engine.modules import QuantSpec


@dataclass
class MethodReport:
    """What the method did and what it cost; goes verbatim into the run record."""

    calib_seconds: float = 0.0
    peak_memory_bytes: int = 0
    keep_fp: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def check_rows(key: str, wanted: int, available: int, where: str) -> None:
    """Fail loudly when a recipe asks for more calibration rows than were captured (no silent cap)."""
    if wanted > available:
        raise ValueError(
            f"<method.{key}> asks for {wanted} calibration rows {where}, but the captured calibration data "
            f"holds {available}; raise calibration.n_samples (FP trajectories; the runner captures what "
            "Method.calibration_rows_per_step declares) or lower the request")


@dataclass
class QuantResult:
    model: DiffusionModel
    report: MethodReport


class Method(ABC):
    """Base class: holds the method's config (from its yaml) and the selected recipe's knobs.

    `cfg` is the method's config group as a plain dict; `cfg["recipes"][recipe]` (if present) is
    merged over the top-level keys, so `recipe=paper` changes iteration counts and sample sizes and
    the record shows exactly which values ran.
    """

    name: str = "base"
    # The ablation variant that *is* the method (all parts on): recorded without a variant label, so
    # it is the method's row in the main table and the "full" row of its ablation table.
    full_variant: str | None = None

    def __init__(self, cfg: dict[str, Any], recipe: str = "quick") -> None:
        recipes = cfg.get("recipes") or {}
        if recipes and recipe not in recipes:
            raise ValueError(f"<recipe={recipe}> is not defined for method {self.name}; accepted: {sorted(recipes)}")
        merged = {k: v for k, v in cfg.items() if k != "recipes"}
        merged.update(recipes.get(recipe, {}))
        self.recipe_name = recipe
        self.cfg = merged

    @property
    def keep_fp(self) -> list[str]:
        return list(self.cfg.get("keep_fp", []))

    def quantize(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> QuantResult:
        """Copy the model, quantize the copy, time it and record peak memory."""
        net = copy.deepcopy(model.net).eval()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        report = self.quantize_net(model.with_net(net), calib, spec)
        report.calib_seconds = time.perf_counter() - start
        if torch.cuda.is_available():
            report.peak_memory_bytes = torch.cuda.max_memory_allocated()
        settings = {k: v for k, v in self.cfg.items() if k not in ("keep_fp", "name")}
        report.recipe = {**settings, "recipe": self.recipe_name}
        return QuantResult(model.with_net(net), report)

    def calibration_rows_per_step(self, schedule: list[int], num_train_timesteps: int) -> int:
        """The most calibration rows this recipe takes at any one sampler step (0: none).

        The harness captures at least this many rows per step (calibration.n_samples is a floor),
        so a recipe is never silently cut to the rows that happen to exist."""
        return 0

    @abstractmethod
    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        """Quantize `model.net` in place (it is already a private copy)."""


METHODS: Registry[type[Method]] = Registry("method")
