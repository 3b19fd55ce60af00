"""PTQ4DM (Shang et al., CVPR 2023): normally distributed time-step calibration + QDrop-style BRECQ.

Calibration timesteps are drawn from N(mean, std) over normalized time t / T (their scripts: mean 0.4,
std 0.4), clipped to the range the sampler visits and mapped to the nearest visited timestep; each
draw takes a row of the FP trajectories at that timestep (the sample the FP sampler produced there).
Then activation ranges are initialised (MSE) and each block is reconstructed with AdaRound weights
and learned (LSQ) activation step sizes jointly, with QDrop (drop probability 0.5): variant `qdrop`,
the main table's PTQ4DM, a QDrop-based codebase as theirs. The released sampling script runs no
reconstruction at all: variant `released` (`method.variant=released`, an ablation-table row) is
that script's recipe, NDTC rows with MSE ranges, symmetric grids, first / last layer at 8 bits.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, replace

import torch
from torch import nn

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from methods.base import METHODS, Method, MethodReport, check_rows
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantLayer, QuantSpec, quant_layers
from methods.engine.reconstruction import ReconConfig, reconstruct_model
from methods.rtn import finish, insert_quantizers, method_spec
from methods.settings import ReconSettings, bounded, choice

# qdrop: NDTC calibration + QDrop-style BRECQ with learned activation step sizes (this harness's
# PTQ4DM, the main table's row); released: what the released sampling script runs: NDTC calibration,
# MSE range init only, symmetric quantizers, the first and last layer at 8 bits, no reconstruction.
VARIANTS = ("qdrop", "released")


def draw_timesteps(visited: list[int], num_train_timesteps: int, n_rows: int, mean: float, std: float,
                   gen: torch.Generator) -> torch.Tensor:
    """`n_rows` timesteps from N(mean, std) over t / T, clipped to and snapped onto `visited`."""
    if n_rows < 1 or std <= 0:
        raise ValueError(f"<calib_rows={n_rows}> must be positive and <t_std={std}> > 0")
    steps = torch.tensor(sorted(set(visited)), dtype=torch.float64)
    u = (torch.randn(n_rows, generator=gen, dtype=torch.float64) * std + mean) * num_train_timesteps
    u = u.clamp(float(steps.min()), float(steps.max()))
    return steps[(u[:, None] - steps[None, :]).abs().argmin(dim=1)].long()


def normal_timestep_rows(calib: CalibData, n_rows: int, mean: float, std: float, seed: int) -> CalibData:
    """`n_rows` rows whose timesteps follow N(mean, std) over t / T, snapped to visited timesteps.

    Each draw takes a distinct row (a distinct FP sample at that timestep, as the paper generates
    one per draw); a timestep drawn more often than it has rows is an error, never a silent reuse."""
    gen = torch.Generator().manual_seed(seed)
    nearest = draw_timesteps(calib.t.tolist(), calib.num_train_timesteps, n_rows, mean, std, gen)
    chosen: list[torch.Tensor] = []
    for ts, count in zip(*torch.unique(nearest, return_counts=True), strict=True):
        rows = torch.nonzero(calib.t == ts).flatten()
        check_rows("calib_rows", int(count), rows.numel(), f"at timestep {int(ts)} (drawn {int(count)} times)")
        chosen.append(rows[torch.randperm(rows.numel(), generator=gen)][: int(count)])
    return calib.subset(torch.cat(chosen).sort().values)


@dataclass(frozen=True, kw_only=True)
class PTQ4DMSettings(ReconSettings):
    """The keys of conf/method/ptq4dm.yaml (top level and recipes), checked before anything loads."""

    variant: str = choice("qdrop", VARIANTS)
    t_mean: float
    t_std: float = bounded(lo=0.0)
    calib_rows: int = bounded(lo=1)


@METHODS.register("ptq4dm")
class PTQ4DM(Method):
    name = "ptq4dm"
    full_variant = "qdrop"  # the main table's PTQ4DM row; "released" is an ablation row
    Settings = PTQ4DMSettings

    def calibration_rows_per_step(self, schedule: list[int], num_train_timesteps: int) -> int:
        """The largest number of draws that land on one timestep (the same seeded draw as quantize)."""
        gen = torch.Generator().manual_seed(int(self.cfg.get("seed", 0)))
        drawn = draw_timesteps(schedule, num_train_timesteps, int(self.cfg["calib_rows"]),
                               float(self.cfg["t_mean"]), float(self.cfg["t_std"]), gen)
        return int(torch.unique(drawn, return_counts=True)[1].max())

    def quantize_net(self, model: DiffusionModel, calib: CalibData, spec: QuantSpec) -> MethodReport:
        cfg = self.cfg
        released = cfg.get("variant", "qdrop") == "released"
        spec = method_spec(spec, cfg)
        if released:
            spec = replace(spec, weight_symmetric=True, act_symmetric=True, weight_init="mse", act_init="mse")
        fp_model = model.with_net(copy.deepcopy(model.net))  # targets: untouched FP copy
        details = insert_quantizers(model, spec, [] if released else self.keep_fp, cfg.get("quant_attention", True))
        details["variant"] = cfg.get("variant", "qdrop")
        if released:
            details["eight_bit_layers"] = requantize(model.net, self.keep_fp, replace(
                spec, weight_bits=max(8, spec.weight_bits), act_bits=None if spec.act_bits is None else 8))
        rows = normal_timestep_rows(
            calib, int(cfg["calib_rows"]), float(cfg["t_mean"]), float(cfg["t_std"]), int(cfg.get("seed", 0))
        )
        ts, counts = torch.unique(rows.t, return_counts=True)
        details["calib_rows"] = len(rows)
        details["calib_timestep_counts"] = {int(t): int(c) for t, c in zip(ts, counts, strict=True)}
        if spec.act_bits is not None:
            calibrate_activations(model, rows, int(cfg.get("capture_batch_size", 64)))
        if not released:
            recon = ReconConfig.from_config(cfg, learn_act_scale=spec.act_bits is not None)
            details["recon"] = reconstruct_model(model, fp_model, rows, recon)
            details["adaround"] = details["recon"]["rounding"]
        details.update(finish(model))
        return MethodReport(keep_fp=[] if released else self.keep_fp, details=details)


def requantize(net: nn.Module, patterns: list[str], spec: QuantSpec) -> list[str]:
    """Re-wrap the QuantLayers whose names match `patterns` with `spec` (e.g. first / last layer at
    8 bits); returns their names."""
    done = []
    for name, layer in list(quant_layers(net)):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, QuantLayer(layer.layer, spec))
            done.append(name)
    return done
