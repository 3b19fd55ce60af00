"""Finite set calibration (FSC): one activation range per timestep the sampler visits.

A sampler visits a fixed, finite set of timesteps, and the temporal features' ranges swing widely
across it, so a single range wastes most of the grid at every step. FSC gives the activation
quantizers of the TIB (scope "tib") or of the whole network (scope "all", as TFMQ's reference code
does) one (scale, zero point) per timestep value. Parameters are keyed by the timestep value itself,
never by a step counter, and a denoiser call at a timestep outside the calibrated set fails with a
message naming both schedules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from methods.engine.calibrate import calibrate_activations
from methods.engine.context import install_timestep_context
from methods.engine.modules import QuantLayer
from methods.engine.quantizer import ActQuantizer
from methods.temporal.tib import TIB, iter_schedule

FSC_SCOPES: tuple[str, ...] = ("tib", "all")


def tib_act_quantizers(net: nn.Module, tib: TIB) -> dict[str, ActQuantizer]:
    """The activation quantizers at the inputs of the TIB's quantized layers, by name."""
    out: dict[str, ActQuantizer] = {}
    for name in tib.layers:
        layer = net.get_submodule(name)
        if isinstance(layer, QuantLayer):
            pairs = (("act_quantizer", layer.act_quantizer), ("act_quantizer_split", layer.act_quantizer_split))
            out.update({f"{name}.{suffix}": q for suffix, q in pairs if q is not None})
    return out


@torch.no_grad()
def calibrate_tib_per_timestep(net: nn.Module, tib: TIB, schedule: list[int], labels: list[int]) -> list[str]:
    """Per-timestep ranges for the TIB's activation quantizers over every (timestep, label) pair.

    The TIB's input is only (t, label), so this is exact: every value the quantizer will ever see at
    inference is observed. Returns the names of the quantizers calibrated.
    """
    quantizers = tib_act_quantizers(net, tib)
    for q in quantizers.values():
        q.reset_observations()
        q.mode = "observe"
    for _ in iter_schedule(net, tib, schedule, labels):
        pass  # observing is the point: the quantizers record each timestep's range
    for q in quantizers.values():
        q.finalize_per_timestep()
    return sorted(quantizers)


def calibrate_every_quantizer(model: DiffusionModel, rows: CalibData, batch_size: int) -> None:
    """Scope "all": per-timestep ranges for every activation quantizer of the network.

    Needs rows at every timestep of the schedule (the captured FP trajectories have them). The TIB's
    quantizers are best refined afterwards with `calibrate_tib_per_timestep`, over every label.
    """
    missing = sorted(set(rows.schedule) - set(rows.t.unique().tolist()))
    if missing:
        raise ValueError(
            f"FSC scope 'all' needs calibration rows at every sampler timestep; missing {missing} of "
            f"schedule {rows.schedule}"
        )
    calibrate_activations(model, rows, batch_size, per_timestep=True)


def per_timestep_quantizers(net: nn.Module) -> list[str]:
    """Names of the activation quantizers that hold one range per timestep."""
    return sorted(n for n, m in net.named_modules() if isinstance(m, ActQuantizer) and m.per_timestep)


def _schedule_error(calibrated: list[int], requested: Iterable[int], missing: list[int]) -> ValueError:
    return ValueError(
        f"timesteps {missing} were not calibrated. Finite set calibration covered the sampler schedule "
        f"{list(calibrated)} ({len(calibrated)} steps); the sampler requested {list(requested)}. Sample with "
        "the same sampler (name, steps) as calibration, or recalibrate for the new schedule"
    )


def check_schedule(net: nn.Module, schedule: list[int]) -> None:
    """Fail before sampling when `schedule` visits a timestep the network was not calibrated for."""
    calibrated = getattr(net, "_fsc_schedule", None)
    if calibrated is None:
        return
    missing = [t for t in schedule if t not in set(calibrated)]
    if missing:
        raise _schedule_error(calibrated, schedule, missing)


def guard_schedule(net: nn.Module, schedule: list[int]) -> None:
    """Make every denoiser call check its timesteps against the calibrated schedule (idempotent).

    The per-timestep quantizers would fail too, but only with the one timestep they lack; the guard
    names the calibrated schedule and the timesteps requested so far in this process.
    """
    net._fsc_schedule = [int(t) for t in schedule]
    install_timestep_context(net)
    if getattr(net, "_fsc_guard_installed", False):
        return
    requested: dict[int, None] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            return
        calibrated = set(module._fsc_schedule)
        values = [int(v) for v in torch.as_tensor(t).flatten().unique().tolist()]
        requested.update(dict.fromkeys(values))
        missing = [v for v in values if v not in calibrated]
        if missing:
            raise _schedule_error(module._fsc_schedule, requested, missing)

    net.register_forward_pre_hook(pre, with_kwargs=True)
    net._fsc_guard_installed = True
