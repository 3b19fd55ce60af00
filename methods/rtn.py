"""RTN: round-to-nearest with min-max ranges, no reconstruction. The floor every method must beat.

Weights: per-output-channel min-max. Activations: per-tensor min-max over calibration rows drawn at
random from the FP trajectories. Layer inputs and, where activations are quantized, the attention
matmul operands (Q, K, V, softmax) are quantized, as in every method here, so that a comparison
measures the method and not what was quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from methods.base import METHODS, Method, MethodReport, check_rows
from methods.engine import phases
from methods.engine.attention import quantize_attention
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantSpec, act_quantizers, freeze_weights, quant_layers, quantize_layers
from methods.settings import GridSettings, bounded


def method_spec(spec: QuantSpec, cfg: dict[str, Any]) -> QuantSpec:
    """The run's bit-widths with the method's own range-init and grid choices (from its yaml)."""
    return replace(
        spec,
        weight_init=cfg.get("weight_init", spec.weight_init),
        act_init=cfg.get("act_init", spec.act_init),
        weight_symmetric=bool(cfg.get("weight_symmetric", spec.weight_symmetric)),
        act_symmetric=bool(cfg.get("act_symmetric", spec.act_symmetric)),
    )


def insert_quantizers(model: DiffusionModel, spec: QuantSpec, keep_fp: list[str], attention: bool) -> dict[str, Any]:
    """Swap layers for QuantLayers (except `keep_fp` globs) and, with activation bits, quantize the
    attention matmuls. Returns what was done, for the report."""
    with phases.phase(phases.RANGE_INIT):  # every weight quantizer's range (an MSE search for most methods)
        kept = quantize_layers(model.net, spec, keep_fp)
    attn = quantize_attention(model.net, spec) if attention else []
    return {
        "kept_fp_layers": kept,
        "quant_layers": sum(1 for _ in quant_layers(model.net)),
        "attention_quantized": attn,
        "spec": asdict(spec),
    }


def random_rows(calib: CalibData, n: int, seed: int) -> CalibData:
    """`n` calibration rows drawn uniformly without replacement (an error when fewer exist)."""
    check_rows("calib_rows", n, len(calib), "in all")
    if n == len(calib):
        return calib
    gen = torch.Generator().manual_seed(seed)
    return calib.subset(torch.randperm(len(calib), generator=gen)[:n].sort().values)


def finish(model: DiffusionModel) -> dict[str, Any]:
    """Cache quantized weights; report the activation quantizers left off (never reached)."""
    freeze_weights(model.net)
    off = [name for name, q in act_quantizers(model.net) if q.mode != "quant"]
    return {"act_quantizers_off": off}


@dataclass(frozen=True, kw_only=True)
class RTNSettings(GridSettings):
    """The keys of conf/method/rtn.yaml (top level and recipes), checked before anything loads."""

    calib_rows: int = bounded(lo=1)
    batch_size: int = bounded(lo=1)


@METHODS.register("rtn")
class RTN(Method):
    """Min-max weights per channel, min-max activations per tensor, nothing learned."""

    name = "rtn"
    Settings = RTNSettings

    def calibration_rows_per_step(self, schedule: list[int], num_train_timesteps: int) -> int:
        return -(-int(self.cfg["calib_rows"]) // len(schedule))  # rows drawn over all steps

    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        spec = method_spec(spec, self.cfg)
        details = insert_quantizers(model, spec, self.keep_fp, self.cfg.get("quant_attention", True))
        if spec.act_bits is not None:
            rows = random_rows(calib, int(self.cfg["calib_rows"]), int(self.cfg.get("seed", 0)))
            calibrate_activations(model, rows, int(self.cfg["batch_size"]))
            details["calib_rows"] = len(rows)
        details.update(finish(model))
        return MethodReport(keep_fp=self.keep_fp, details=details)
