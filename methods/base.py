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
from torch.profiler import ProfilerActivity, profile

from harness.calibration import CalibData
from harness.models.base import DiffusionModel, denoise
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
    footprint: dict[str, int] = field(default_factory=dict)  # the model's own memory: see `model_footprint`


def check_rows(key: str, wanted: int, available: int, where: str) -> None:
    """Fail loudly when a recipe asks for more calibration rows than were captured (no silent cap)."""
    if wanted > available:
        raise ValueError(
            f"<method.{key}> asks for {wanted} calibration rows {where}, but the captured calibration data "
            f"holds {available}; raise calibration.n_samples (FP trajectories; the runner captures what "
            "Method.calibration_rows_per_step declares) or lower the request")


def activation_peak_bytes(model: DiffusionModel, batch_size: int, timestep: int) -> int:
    """Peak bytes of tensors alive during one denoiser call at `batch_size` (doubled under CFG, as
    sampling calls it), weights and inputs excluded. CUDA: the allocator's peak; CPU: the running sum
    of torch.profiler's memory events (allocations per op, frees as they happen)."""
    device = next(iter(model.net.parameters()), torch.empty(0)).device
    n = batch_size * (2 if model.is_conditional and model.guidance_scale != 1.0 else 1)
    x = torch.zeros(n, *model.sample_shape, device=device)
    t = torch.full((n,), timestep, dtype=torch.long, device=device)
    cond = None
    if model.conditions is not None:
        cond = model.conditions.embed(model.conditions.draw(0, 0, batch_size), device)
        if n > batch_size:
            cond = torch.cat([cond, model.null_cond(batch_size, device)])
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            denoise(model, x, t, cond)
            return int(torch.cuda.max_memory_allocated(device) - base)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            denoise(model, x, t, cond)
    steps = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                   for e in prof.events())
    live = peak = 0
    for _, delta in steps:
        live += delta
        peak = max(peak, live)
    return int(peak)


def model_footprint(model: DiffusionModel, batch_size: int, timestep: int) -> dict[str, int]:
    """The model's own memory, apart from the process's (whose peak RSS holds the interpreter, torch,
    calibration data and the FP copy): weights stored at their bit-width (packed quantized weights
    with their grids, everything else fp32; harness.metrics.latency.weight_bytes) and the activation
    peak of one denoiser call at the eval batch."""
    # imported here: harness.metrics.latency imports methods.engine, whose package imports this module
    from harness.metrics.latency import weight_bytes

    return {"model_weight_bytes": weight_bytes(model.net),
            "activation_peak_bytes": activation_peak_bytes(model, batch_size, timestep),
            "footprint_batch_size": batch_size}


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

    def quantize(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec,
                 footprint_batch: int | None = None) -> QuantResult:
        """Copy the model, quantize the copy, time it and record peak memory; with `footprint_batch`
        (the eval batch size), also the model's own footprint (`report.footprint`, untimed)."""
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
        result = QuantResult(model.with_net(net), report)
        if footprint_batch:
            timestep = calib.schedule[0] if calib is not None else int(model.scheduler_config.get(
                "num_train_timesteps", 1000)) - 1  # a calibrated timestep: per-timestep quantizers need one
            report.footprint = model_footprint(result.model, footprint_batch, timestep)
        return result

    def calibration_rows_per_step(self, schedule: list[int], num_train_timesteps: int) -> int:
        """The most calibration rows this recipe takes at any one sampler step (0: none).

        The harness captures at least this many rows per step (calibration.n_samples is a floor),
        so a recipe is never silently cut to the rows that happen to exist."""
        return 0

    @abstractmethod
    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        """Quantize `model.net` in place (it is already a private copy)."""


METHODS: Registry[type[Method]] = Registry("method")
