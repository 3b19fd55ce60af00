"""A traceable twin of the fake-quant network, for export to OpenVINO.

Every quantizer becomes an `aten::fake_quantize_*` op, which OpenVINO's PyTorch frontend turns into
a FakeQuantize node; the CPU plugin's low-precision transformations then run the convolutions and
matmuls that such nodes feed in int8. Weights are the frozen `w_q` behind a per-channel FakeQuantize
with the weight quantizer's own (centred) grid, which reproduces `w_q` and lets OpenVINO store
integer weights.

Per-timestep (FSC / TFMQ) activation parameters cannot be constants of one graph. They enter as a
graph input `qparams` = [s_0, z_0, s_1, z_1, ...] (one pair per per-timestep quantizer, in `slots`
order), filled for the current timestep by `QParamTable.values(t)`; the OpenVINO backend then either
bakes them in as constants, one compiled model per timestep, or feeds them at run time. TFMQ's
feature caches read (timestep, label) from the call context, which a trace would freeze; in the twin
they read their row positions from a graph input `cache_pos` (2, B) = (timestep row, label row),
computed per call by `QParamTable.positions`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.backends.lowering import input_groups, integer_weight
from harness.models.base import DiffusionModel, denoise
from methods.engine.modules import QuantLayer
from methods.engine.quantizer import ActQuantizer
from methods.temporal.cache import TemporalFeatureCache

INT8_MIN, INT8_MAX = -128, 127


class QParamTable(nn.Module):
    """What a traced graph cannot hold as constants: the per-timestep quantizers (their parameters
    enter as `qparams`) and the feature caches (their row positions enter as `cache_pos`)."""

    def __init__(self) -> None:
        super().__init__()
        self.slots: list[ActQuantizer] = []
        self.caches: list[TemporalFeatureCache] = []
        self.current: torch.Tensor | None = None
        self.current_positions: torch.Tensor | None = None

    def add(self, q: ActQuantizer) -> int:
        self.slots.append(q)
        return len(self.slots) - 1

    def add_cache(self, cache: TemporalFeatureCache) -> None:
        first = self.caches[0] if self.caches else cache
        if not (torch.equal(first.timesteps, cache.timesteps) and torch.equal(first.labels, cache.labels)):
            raise NotImplementedError("feature caches built for different (timestep, label) sets cannot share "
                                      "one position input; build every cache from the same schedule")
        self.caches.append(cache)

    def positions(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(2, B) rows of the caches for each sample's timestep and label (ValueError if absent)."""
        cache = self.caches[0]
        rows = [_rows(cache.timesteps, t, "timestep")]
        if cache.labels.numel():
            if labels is None:
                raise ValueError("the feature caches are keyed by class label, but the call passed none")
            rows.append(_rows(cache.labels, labels.expand_as(t) if labels.numel() == 1 else labels, "label"))
        else:
            rows.append(torch.zeros_like(rows[0]))
        return torch.stack(rows)

    def values(self, t: int) -> torch.Tensor:
        """[s_0, z_0, s_1, z_1, ...] at timestep t (KeyError naming the calibrated ones if absent)."""
        pairs = [torch.stack([s.float(), z.float()]) for s, z in (q.timestep_params(t) for q in self.slots)]
        return torch.cat(pairs).cpu() if pairs else torch.zeros(0)


def _rows(keys: torch.Tensor, wanted: torch.Tensor, what: str) -> torch.Tensor:
    wanted = wanted.flatten().long().cpu()
    keys = keys.cpu()
    match = wanted[:, None] == keys[None, :]
    missing = sorted(set(wanted[~match.any(dim=1)].tolist()))
    if missing:
        raise ValueError(f"temporal feature cache has no entry for {what} {missing}: it was built for "
                         f"{what}s {keys.tolist()}; sample with the calibration's sampler and labels")
    return match.long().argmax(dim=1)


class CacheLookup(nn.Module):
    """A TemporalFeatureCache that reads its row positions from the `cache_pos` graph input."""

    def __init__(self, cache: TemporalFeatureCache, table: QParamTable) -> None:
        super().__init__()
        self.cache = cache
        self.table = [table]
        table.add_cache(cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.table[0].current_positions
        if pos is None:
            raise RuntimeError("feature cache called without cache_pos (export wrapper not in use)")
        return self.cache.lookup(pos[0], pos[1]).to(x.dtype)


class FQAct(nn.Module):
    """An activation quantizer as a FakeQuantize op: static parameters, or a slot of `qparams`."""

    def __init__(self, q: ActQuantizer, table: QParamTable) -> None:
        super().__init__()
        self.enabled = q.mode == "quant"
        self.qmin, self.qmax = q.qmin, q.qmax
        self.scale, self.zero_point = float(q.scale.reshape(-1)[0]), int(q.zero_point.reshape(-1)[0])
        self.slot = table.add(q) if self.enabled and q.per_timestep else None
        self.table = [table]  # a list: the table is shared, not a submodule of every quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.slot is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        p = self.table[0].current
        if p is None:
            raise RuntimeError("per-timestep quantizer called without qparams (export wrapper not in use)")
        s, z = p[2 * self.slot], p[2 * self.slot + 1]
        return torch.fake_quantize_per_tensor_affine(x, s, z.round().to(torch.int32), self.qmin, self.qmax)


class FQLayer(nn.Module):
    """A QuantLayer as FakeQuantize(input) -> conv / linear with a FakeQuantize'd integer-grid weight."""

    def __init__(self, layer: QuantLayer, table: QParamTable) -> None:
        super().__init__()
        inner = layer.layer
        w = integer_weight(layer)
        self.layer = inner
        self.register_buffer("weight", w.dequantize())
        self.register_buffer("w_scale", w.scale.clone())
        shape = (-1,) + (1,) * (w.codes.dim() - 1)
        levels = w.codes.int() - w.zero_point.reshape(shape)
        if int(levels.min()) >= INT8_MIN and int(levels.max()) <= INT8_MAX:
            # Same values on the symmetric int8 grid (zero point 0): OpenVINO's CPU plugin lowers
            # only zero-point-free weights to int8 everywhere, and has no 4-bit convolution anyway.
            self.register_buffer("w_zero_point", torch.zeros_like(w.zero_point))
            self.w_qmin, self.w_qmax = INT8_MIN, INT8_MAX
        else:
            self.register_buffer("w_zero_point", w.zero_point.clone())
            self.w_qmin, self.w_qmax = -(2 ** (w.bits - 1)), 2 ** (w.bits - 1) - 1
        groups = input_groups(layer) or []
        self.acts = nn.ModuleList([FQAct(g.quantizer, table) for g in groups])
        self.split = groups[1].start if len(groups) == 2 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            x = torch.cat([self.acts[0](x[:, : self.split]), self.acts[1](x[:, self.split :])], dim=1)
        elif len(self.acts):
            x = self.acts[0](x)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zero_point, 0,
                                                   self.w_qmin, self.w_qmax)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


class ExportWrapper(nn.Module):
    """forward(sample, timestep, cond, qparams, cache_pos) -> tensor: the traceable denoiser call
    (cond, qparams, cache_pos are None, and absent from the graph, where the model has no such thing)."""

    def __init__(self, model: DiffusionModel, table: QParamTable) -> None:
        super().__init__()
        self.model = model
        self.net = model.net
        self.table = table

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor | None = None,
                qparams: torch.Tensor | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        self.table.current, self.table.current_positions = qparams, cache_pos
        try:
            return denoise(self.model, sample, timestep, cond)
        finally:
            self.table.current = self.table.current_positions = None


def export_twin(model: DiffusionModel) -> ExportWrapper:
    """A deep copy of `model` with every QuantLayer / ActQuantizer replaced by FakeQuantize ops."""
    net = copy.deepcopy(model.net).eval()
    table = QParamTable()
    for name, module in list(net.named_modules()):
        if isinstance(module, QuantLayer):
            _replace(net, name, FQLayer(module, table))
    for name, module in list(net.named_modules()):
        if isinstance(module, ActQuantizer):
            _replace(net, name, FQAct(module, table))
        elif isinstance(module, TemporalFeatureCache):
            _replace(net, name, CacheLookup(module, table))
    return ExportWrapper(model.with_net(net), table)


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)
