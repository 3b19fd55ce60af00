"""Activation range calibration: run calibration rows through the network and set every activation
quantizer's range from what it saw.

Ranges are per tensor over all rows by default. With per-timestep calibration (TFMQ's finite set
calibration) the rows are fed one timestep per batch, so each quantizer also knows its range at
every timestep, and the selected quantizers get one (scale, zero point) per timestep value.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from harness.calibration import CalibData
from harness.models.base import DiffusionModel, denoise
from harness.progress import progress_bar
from methods.engine import phases
from methods.engine.context import install_timestep_context
from methods.engine.modules import act_quantizers

log = logging.getLogger(__name__)

PerTimestep = bool | Callable[[str], bool] | Iterable[str]


def net_device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def batch_inputs(batch: CalibData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, t, cond) of a calibration batch on `device`, ready for `denoise`."""
    cond = None if batch.cond is None else batch.cond.to(device)
    return batch.x.to(device), batch.t.to(device), cond


def _selector(per_timestep: PerTimestep) -> Callable[[str], bool]:
    if isinstance(per_timestep, bool):
        return lambda _name: per_timestep
    if callable(per_timestep):
        return per_timestep
    patterns = list(per_timestep)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


@torch.no_grad()
def calibrate_activations(
    model: DiffusionModel, calib: CalibData, batch_size: int, per_timestep: PerTimestep = False
) -> None:
    """Observe every activation quantizer of `model.net` over `calib`, then switch them to "quant".

    `per_timestep`: False (one range per quantizer), True (per-timestep ranges for all), or a
    selection of quantizers by name: a predicate `name -> bool` or glob patterns over the names
    `act_quantizers(model.net)` yields. Unselected quantizers get global ranges. A quantizer that
    never saw data (its layer is not reached by this model's forward) is switched off and logged.
    """
    if batch_size < 1:
        raise ValueError(f"<batch_size={batch_size}> must be a positive integer")
    with phases.phase(phases.RANGE_INIT):
        _observe_and_finalize(model, calib, batch_size, per_timestep)


def _observe_and_finalize(model: DiffusionModel, calib: CalibData, batch_size: int, per_timestep: PerTimestep
                          ) -> None:
    net = model.net
    install_timestep_context(net)
    quantizers = list(act_quantizers(net))
    if not quantizers:
        return
    for _, q in quantizers:
        q.reset_observations()
        q.mode = "observe"
    select = _selector(per_timestep)
    by_timestep = any(select(name) for name, _ in quantizers)
    device = net_device(net)
    total = -(-len(calib) // batch_size) if not by_timestep else sum(
        -(-int((calib.t == ts).sum()) // batch_size) for ts in calib.schedule
    )
    for batch in progress_bar(calib.batches(batch_size, by_timestep=by_timestep), total=total, desc="calibrate acts"):
        denoise(model, *batch_inputs(batch, device))
    for name, q in quantizers:
        if q._lo is None:
            log.warning("activation quantizer %s saw no data during calibration; left off", name)
            q.mode = "off"
        elif by_timestep and select(name):
            q.finalize_per_timestep()
        else:
            q.finalize()
