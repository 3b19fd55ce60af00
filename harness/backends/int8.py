"""The int8 backend: real integer weights and integer matmul / convolution.

Each QuantLayer becomes an `IntegerLayer`: its weight is stored as integer codes at the target
bit-width (int8, or two 4-bit codes per byte) with per-channel scales and zero points, and the FP
weight is dropped. At call time the input is quantized with the method's own parameters (per
timestep when the method calibrated them so: FSC / TFMQ), and the product runs on an integer kernel
(harness/backends/kernels.py). Layers whose input is not quantized (a32) run weight-only: fp32
compute on weights dequantized per call from the stored codes. Everything else in the network
(norms, attention matmuls with their fake quantizers, TFMQ's feature caches) runs as in the fake
model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.backends.base import BACKENDS, Backend, device_name, net_device
from harness.backends.kernels import ConvGeometry, IntKernel, select_kernel
from harness.backends.lowering import (
    act_params,
    centring_offset,
    input_groups,
    integer_weight,
)
from harness.backends.packing import PackedWeight
from harness.models.base import DiffusionModel
from methods.engine.context import install_timestep_context
from methods.engine.modules import QuantLayer, QuantSpec, act_quantizers, quant_layers

FP32_BYTES = 4


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(layer: nn.Conv2d | nn.Linear) -> ConvGeometry | None:
    if isinstance(layer, nn.Linear):
        return None
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise ValueError(f"int8 backend runs dense zero-padded convolutions with numeric padding; got groups="
                         f"{layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    return ConvGeometry(_pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding), _pair(layer.dilation))


def _conv_layout(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class IntegerLayer(nn.Module):
    """A Conv2d / Linear with integer weights (packed) executed by an integer kernel."""

    def __init__(self, layer: QuantLayer, kernel_cls: type[IntKernel]) -> None:
        super().__init__()
        inner = layer.layer
        weight = integer_weight(layer)
        packed = PackedWeight.pack(weight.codes, weight.bits)
        codes = packed.unpack()
        if not torch.equal(codes, weight.codes):
            raise RuntimeError("weight packing did not round-trip; refusing to run a different network")
        self.bits, self.shape = weight.bits, packed.shape
        self.register_buffer("weight_packed", packed.data)
        self.register_buffer("weight_scale", weight.scale)
        self.register_buffer("weight_zero_point", weight.zero_point.to(torch.int8))
        self.geometry = _geometry(inner)
        self.bias = None if inner.bias is None else inner.bias.detach().clone()
        groups = input_groups(layer)
        # The quantizers stay submodules: per-timestep tables travel with the network and
        # act_quantizers(net) still lists them.
        self.quantizers = nn.ModuleList([g.quantizer for g in groups or []])
        self.ranges = [(g.start, g.stop) for g in groups or []]
        self.kernels: list[IntKernel] = []
        if groups is None:
            self.weight_codes = codes  # weight-only: dequantized per call
            return
        for i, g in enumerate(groups):
            self.kernels.append(kernel_cls(weight.in_channels(g.start, g.stop), self.geometry,
                                           self.bias if i == 0 else None, g.quantizer,
                                           centring_offset(g.quantizer)))

    @property
    def weight_only(self) -> bool:
        return not self.kernels

    @property
    def packed_bytes(self) -> int:
        """Stored weight bytes: packed codes, fp32 scales, int8 zero points (absent when symmetric)."""
        zp = 0 if not bool(self.weight_zero_point.any()) else self.weight_zero_point.numel()
        return self.weight_packed.numel() + FP32_BYTES * self.weight_scale.numel() + zp

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        zp, scale = self.weight_zero_point.float().reshape(shape), self.weight_scale.reshape(shape)
        w = (self.weight_codes.float() - zp) * scale
        g = self.geometry
        if g is None:
            return F.linear(x, w, self.bias)
        return F.conv2d(x, w, self.bias, g.stride, g.padding, g.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_only:
            return self._weight_only(x)
        out: torch.Tensor | None = None
        single = len(self.kernels) == 1
        for (start, stop), q, kernel in zip(self.ranges, self.quantizers, self.kernels, strict=True):
            part = x if single else x[:, start:stop]
            scale, zp = act_params(q)
            y = kernel(part, scale, zp)
            out = y if out is None else out + y
        if self.geometry is not None:
            # The memory layout F.conv2d would give (it follows the input's): the float ops that follow
            # (GroupNorm, SiLU) then sum in the same order as in the fake model and give the same bits.
            out = out.contiguous(memory_format=_conv_layout(x))
        return out

    def extra_repr(self) -> str:
        kind = "weight-only" if self.weight_only else self.kernels[0].name
        return f"w{self.bits}, shape={tuple(self.shape)}, groups={len(self.kernels)}, {kind}"


def integer_layers(net: nn.Module) -> list[IntegerLayer]:
    return [m for m in net.modules() if isinstance(m, IntegerLayer)]


@BACKENDS.register("int8")
class Int8Backend(Backend):
    """Integer weights and integer kernels on the device the model is on."""

    name = "int8"
    defaults: dict[str, Any] = {"kernel": "auto"}

    def prepare(self, qmodel: DiffusionModel, spec: QuantSpec | None) -> DiffusionModel:
        device = net_device(qmodel.net)
        layers = list(quant_layers(qmodel.net))
        if not layers:
            self._description = {"kernel": "fp32 PyTorch (no quantized layers)", "device": device_name(device),
                                 "bits": "fp" if spec is None else spec.tag}
            return qmodel
        kernel_cls = select_kernel(str(self.cfg["kernel"]), device)
        net = copy.deepcopy(qmodel.net).eval()
        with torch.no_grad():
            for name, layer in list(quant_layers(net)):
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, IntegerLayer(layer, kernel_cls))
        install_timestep_context(net)
        self._description = self._facts(net, kernel_cls, device, spec)
        return qmodel.with_net(net)

    @staticmethod
    def _facts(net: nn.Module, kernel_cls: type[IntKernel], device: torch.device,
               spec: QuantSpec | None) -> dict[str, Any]:
        ints = integer_layers(net)
        inside = {id(q) for layer in ints for q in layer.quantizers}
        others = [name for name, q in act_quantizers(net) if id(q) not in inside and q.mode == "quant"]
        n_int = sum(not m.weight_only for m in ints)
        return {
            "kernel": kernel_cls.name if n_int else "fp32 on int weights dequantized per call (weight-only)",
            "device": device_name(device),
            "bits": None if spec is None else spec.tag,
            "integer_layers": n_int,
            "weight_only_layers": len(ints) - n_int,
            "per_timestep_layers": sum(any(q.per_timestep for q in m.quantizers) for m in ints),
            "fake_quant_elsewhere": len(others),  # e.g. attention matmul operands: fp32 fake quant
            "packed_weight_bytes": sum(m.packed_bytes for m in ints),
            "fp32_weight_bytes": sum(FP32_BYTES * int(torch.Size(m.shape).numel()) for m in ints),
        }
