"""TFMQ-DM (Huang et al., CVPR 2024) and its extension: temporal feature maintenance on Q-Diffusion.

The pipeline is Q-Diffusion's (uniform-step calibration rows, split shortcuts, attention quantizers,
BRECQ + AdaRound weights with activations off, then activation ranges), plus what follows. As in
the reference code there is no activation step-size reconstruction (`act_recon: true` adds
Q-Diffusion's pass). FSC defaults to the TIB's quantizers, so the `fsc` ablation row differs from
`brecq` by FSC alone; scope "all" (the reference code) also swaps every other quantizer's MSE range
for per-timestep min-max ranges. The layers kept FP are the baselines' (`fp_time_embedding: true`
adds the reference code's FP time-embedding linear).


- TIAR: the Temporal Information Block is reconstructed alone, first, against its own outputs over
  every (timestep, label) of the sampler, then frozen for the block reconstruction of the rest.
- FSC: one activation range per sampler timestep for the TIB's quantizers (scope "tib", default) or
  for every activation quantizer (scope "all", as the reference code does).
- Cache: the FP temporal features of every (timestep, label), quantized per timestep to the
  activation bits, are served in place of each projection; the TIB is skipped when all are cached.
- Selection: per feature, the TIB path or the cache path, whichever is measured closer to FP.

Toggles and the ablation variants (conf/experiment/tfmq_*.yaml) are validated by `TfmqToggles`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from methods.base import METHODS, Method, MethodReport
from methods.engine.calibrate import batch_inputs, calibrate_activations, net_device
from methods.engine.context import install_timestep_context
from methods.engine.modules import QuantSpec, set_act_mode
from methods.engine.reconstruction import ReconConfig, merge_rounding, reconstruct_model
from methods.qdiff import QDiffSettings, act_step_sizes, split_shortcuts, uniform_step_rows
from methods.rtn import finish, insert_quantizers, method_spec
from methods.settings import bounded, choice
from methods.temporal.cache import build_caches, install_caches, skip_embedders
from methods.temporal.fsc import (
    FSC_SCOPES,
    calibrate_every_quantizer,
    calibrate_tib_per_timestep,
    guard_schedule,
    per_timestep_quantizers,
)
from methods.temporal.labels import install_label_context
from methods.temporal.selection import Choice, path_errors, select_paths
from methods.temporal.tiar import reconstruct_tib, tib_quant_layers
from methods.temporal.tib import TIB, find_tib

log = logging.getLogger(__name__)

TOGGLES = ("tiar", "fsc", "cache", "select")
# TFMQ-DM's reference code also keeps the first time-embedding linear in FP (UNet; DiT: each block's
# timestep embedder); `fp_time_embedding: true` reproduces that.
TIME_EMBEDDING_FP = ["time_embedding.linear_1", "transformer_blocks.*.norm1.emb.timestep_embedder.linear_1"]
VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {  # (tiar, fsc, cache, select): the paper's ablation rows
    "brecq": (False, False, False, False),
    "tiar": (True, False, False, False),
    "fsc": (False, True, False, False),
    "tiar_fsc": (True, True, False, False),
    "cache": (True, True, True, False),
    "select": (True, True, True, True),
}


@dataclass(frozen=True)
class TfmqToggles:
    """Which TFMQ components run; `variant` names an ablation row and must agree with the toggles."""

    tiar: bool
    fsc: bool
    fsc_scope: str
    cache: bool
    select: bool
    variant: str | None

    @classmethod
    def parse(cls, cfg: dict[str, Any]) -> TfmqToggles:
        flags = {}
        for key in TOGGLES:
            v = cfg.get(key)
            if not isinstance(v, bool):
                raise ValueError(f"<method.{key}={v}> must be true or false")
            flags[key] = v
        scope = cfg.get("fsc_scope")
        if scope not in FSC_SCOPES:
            raise ValueError(f"<method.fsc_scope={scope}> must be one of {', '.join(FSC_SCOPES)}")
        if flags["select"] and not flags["cache"]:
            raise ValueError("<method.select=true> needs <method.cache=true>: selection chooses between the "
                             "TIB path and the cache path")
        variant = cfg.get("variant")
        if variant is not None:
            if variant not in VARIANTS:
                raise ValueError(f"<method.variant={variant}> must be one of {', '.join(VARIANTS)} or null (custom)")
            expected = dict(zip(TOGGLES, VARIANTS[variant], strict=True))
            if expected != flags:
                raise ValueError(f"<method.variant={variant}> means {expected}, but the toggles are {flags}; "
                                 "set the toggles to match or method.variant=null for a custom combination")
        return cls(flags["tiar"], flags["fsc"], scope, flags["cache"], flags["select"], variant)


def _tib_summary(tib: TIB) -> dict[str, Any]:
    return {**asdict(tib), "cacheable": tib.cacheable}


def _reconstruct_weights(model: DiffusionModel, fp_model: DiffusionModel, rows: CalibData, calib: CalibData,
                         tib: TIB, cfg: dict[str, Any], tiar: bool) -> dict[str, Any]:
    """Activations off: TIAR on the TIB (optional), then BRECQ on the rest with the TIB frozen."""
    set_act_mode(model.net, "off")
    out: dict[str, Any] = {}
    frozen: list[str] = []
    if tiar:
        tiar_cfg = ReconConfig.from_config(cfg, iters_key="tiar_iters", batch_size=int(cfg["tiar_batch_size"]))
        out["tiar"] = reconstruct_tib(model.net, fp_model.net, tib, calib.schedule, calib.labels, tiar_cfg)
        frozen = sorted(tib_quant_layers(model.net, tib))
        log.info("TIAR: temporal feature loss %.4g -> %.4g", out["tiar"]["loss_before"], out["tiar"]["loss_after"])
    out["weight_recon"] = reconstruct_model(model, fp_model, rows, ReconConfig.from_config(cfg), frozen=frozen)
    out["adaround"] = merge_rounding([out["weight_recon"]["rounding"], *([out["tiar"]] if tiar else [])])
    return out


def _calibrate_activations(model: DiffusionModel, fp_model: DiffusionModel, rows: CalibData, calib: CalibData,
                           tib: TIB, cfg: dict[str, Any], toggles: TfmqToggles) -> dict[str, Any]:
    """Activation ranges (per timestep where FSC applies), then step-size reconstruction of the
    quantizers that keep one global range, with the final per-timestep ranges already in place."""
    out: dict[str, Any] = {}
    fsc: dict[str, Any] = {"scope": toggles.fsc_scope, "timesteps": list(calib.schedule)}
    batch = int(cfg["capture_batch_size"])
    if toggles.fsc and toggles.fsc_scope == "all":
        every_step = uniform_step_rows(calib, len(calib.schedule), int(cfg["fsc_samples_per_step"]),
                                       int(cfg.get("seed", 0)))
        calibrate_every_quantizer(model, every_step, batch)
        fsc["calib_rows"] = len(every_step)
    else:
        calibrate_activations(model, rows, batch)
    if toggles.fsc:
        calibrate_tib_per_timestep(model.net, tib, calib.schedule, calib.labels)
        out["fsc"] = {**fsc, "per_timestep_quantizers": len(per_timestep_quantizers(model.net))}
    if cfg.get("act_recon", False) and int(cfg.get("act_iters", 0)) > 0:
        out["act_recon"] = act_step_sizes(model, fp_model, rows, cfg)
    return out


def _maintain_by_cache(model: DiffusionModel, fp_model: DiffusionModel, calib: CalibData, tib: TIB,
                       spec: QuantSpec, select: bool) -> dict[str, Any]:
    """Build the caches, measure both paths, install the cache where chosen; skip the TIB if it can."""
    if not tib.cacheable:
        reason = (f"conditions {tib.non_finite} are not a finite set: temporal features cannot be cached; "
                  "fell back to TIB-based maintenance")
        log.warning("cache: %s", reason)
        return {"used": False, "reason": reason}
    caches = build_caches(fp_model.net, tib, tib.features, calib.schedule, calib.labels, spec.act_bits,
                          spec.act_symmetric)
    errors = path_errors(model.net, fp_model.net, tib, caches, calib.schedule, calib.labels)
    choices = select_paths(errors) if select else [Choice(n, "cache", e[0], e[1]) for n, e in errors.items()]
    chosen = {c.feature: caches[c.feature] for c in choices if c.path == "cache"}
    nbytes = install_caches(model.net, chosen)
    skipped = False
    if len(chosen) == len(tib.features):
        probe = calib.subset(torch.arange(1))
        skipped = skip_embedders(model, tib, batch_inputs(probe, net_device(model.net)))
    log.info("cache: %d/%d temporal features cached (%d bytes), TIB compute skipped: %s",
             len(chosen), len(tib.features), nbytes, skipped)
    return {"used": True, "cache_bytes": nbytes, "cached_features": sorted(chosen),
            "tib_features": sorted(c.feature for c in choices if c.path == "tib"),
            "embedders_skipped": skipped, "choices": [c.as_dict() for c in choices]}


@dataclass(frozen=True, kw_only=True)
class TFMQSettings(QDiffSettings):
    """The keys of conf/method/tfmq.yaml (top level and recipes), checked before anything loads;
    `TfmqToggles` then checks that the variant agrees with the toggles."""

    variant: str | None = choice("select", (*VARIANTS, None))
    tiar: bool
    fsc: bool
    fsc_scope: str = choice("tib", FSC_SCOPES)
    act_recon: bool = False
    fp_time_embedding: bool = False
    cache: bool
    select: bool
    fsc_samples_per_step: int = bounded(lo=1)
    tiar_iters: int = bounded(lo=0)
    tiar_batch_size: int = bounded(lo=1)


@METHODS.register("tfmq")
class TFMQ(Method):
    """Q-Diffusion + TIAR + FSC (TIB-based maintenance) + cache + disturbance-aware selection."""

    name = "tfmq"
    full_variant = "select"
    Settings = TFMQSettings

    def __init__(self, cfg: dict[str, Any], recipe: str = "quick") -> None:
        super().__init__(cfg, recipe)
        self.toggles = TfmqToggles.parse(self.cfg)

    @property
    def keep_fp(self) -> list[str]:
        """The shared FP layers, plus the first time-embedding linear with `fp_time_embedding` (the
        reference code's convention; off by default so TFMQ quantizes the same layers as the baselines)."""
        base = super().keep_fp
        extra = TIME_EMBEDDING_FP if self.cfg.get("fp_time_embedding", False) else []
        return [*base, *(p for p in extra if p not in base)]

    def calibration_rows_per_step(self, schedule: list[int], num_train_timesteps: int) -> int:
        wanted = int(self.cfg["samples_per_step"])
        if self.toggles.fsc and self.toggles.fsc_scope == "all":
            wanted = max(wanted, int(self.cfg["fsc_samples_per_step"]))
        return wanted

    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        cfg, toggles = self.cfg, self.toggles
        spec = method_spec(spec, cfg)
        tib = find_tib(model.net)
        if tib.split:
            log.warning("TIB: %s split off (not a finite set); the TIB is the time embedding alone", tib.non_finite)
        fp_model = model.with_net(copy.deepcopy(model.net))
        details: dict[str, Any] = {"variant": toggles.variant, "toggles": asdict(toggles), "tib": _tib_summary(tib)}
        details.update(insert_quantizers(model, spec, self.keep_fp, cfg.get("quant_attention", True)))
        install_timestep_context(model.net)
        install_label_context(model.net)
        rows = uniform_step_rows(calib, int(cfg["n_steps"]), int(cfg["samples_per_step"]), int(cfg.get("seed", 0)))
        details["calib_rows"] = len(rows)
        if spec.act_bits is not None and cfg.get("split_shortcut", True):
            details["split_layers"] = split_shortcuts(model, rows, bool(cfg.get("split_weights", False)))
        details.update(_reconstruct_weights(model, fp_model, rows, calib, tib, cfg, toggles.tiar))
        if spec.act_bits is not None:
            details.update(_calibrate_activations(model, fp_model, rows, calib, tib, cfg, toggles))
        elif toggles.fsc:
            details["fsc"] = {"scope": toggles.fsc_scope, "skipped": "activations are not quantized (a32)"}
        if toggles.cache:
            details["cache"] = _maintain_by_cache(model, fp_model, calib, tib, spec, toggles.select)
        details.update(finish(model))
        if toggles.fsc or toggles.cache:
            guard_schedule(model.net, calib.schedule)
        return MethodReport(keep_fp=self.keep_fp, details=details)
