"""Fake-quant wrappers for Conv2d and Linear, and the model-wide swap that installs them.

A `QuantLayer` keeps the original module (weights untouched) and quantizes its *input* activation
(as Q-Diffusion does, which maps directly onto an integer kernel: quantize input, integer matmul)
and its weight. The weight is quantized once, after calibration, by `freeze()`; until then the
quantized weight comes from the weight quantizer or from a learnable rounding (AdaRound) attached as
`weight_rounding`. An optional second input quantizer covers the channels from `split` on: the
two halves of a UNet skip concatenation have very different ranges (Q-Diffusion's split quantization).
Q-Diffusion's reference also gives the weight columns of the skip half their own per-channel grid
(`enable_split(split, weights=True)`); integer backends store one grid per output channel, so this
is an option.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.engine.quantizer import ActMode, ActQuantizer, RangeInit, UniformQuantizer


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize to: weight bits, activation bits (None = a32, not quantized)."""

    weight_bits: int
    act_bits: int | None
    weight_init: RangeInit = "minmax"
    act_init: RangeInit = "minmax"
    weight_symmetric: bool = False
    act_symmetric: bool = False

    @property
    def tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits or 32}"


class QuantLayer(nn.Module):
    """Quantized Conv2d / Linear around the untouched original."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, spec: QuantSpec) -> None:
        super().__init__()
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"QuantLayer wraps Conv2d or Linear, got {type(layer).__name__}")
        self.layer = layer
        self.weight_quantizer = UniformQuantizer(
            spec.weight_bits, spec.weight_symmetric, channel_axis=0, range_init=spec.weight_init
        )
        self.act_quantizer = (
            ActQuantizer(spec.act_bits, spec.act_symmetric, range_init=spec.act_init) if spec.act_bits else None
        )
        self.act_quantizer_split: ActQuantizer | None = None
        self.weight_quantizer_split: UniformQuantizer | None = None  # input channels [split:], if split
        self.split = 0
        self.weight_rounding: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.use_weight_quant = True
        self.register_buffer("w_q", None, persistent=True)
        with torch.no_grad():
            self.weight_quantizer.init_range(layer.weight)

    # -- weight ----------------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        if self.w_q is not None:
            return self.w_q
        if self.weight_rounding is not None:
            return self.weight_rounding(self.layer.weight)
        w = self.layer.weight
        if self.weight_quantizer_split is not None:
            return torch.cat([self.weight_quantizer(w[:, : self.split]),
                              self.weight_quantizer_split(w[:, self.split :])], dim=1)
        return self.weight_quantizer(w)

    def weight_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) broadcastable to the weight `w`: per output channel, and per input half
        when the weight grid is split."""
        q = self.weight_quantizer
        scale, zp = q._shaped(q.scale.detach(), w), q._shaped(q.zero_point, w)
        if self.weight_quantizer_split is None:
            return scale, zp
        r = self.weight_quantizer_split
        head = (w.shape[0], self.split, *w.shape[2:])
        tail = (w.shape[0], w.shape[1] - self.split, *w.shape[2:])
        return (torch.cat([scale.expand(head), r._shaped(r.scale.detach(), w).expand(tail)], dim=1),
                torch.cat([zp.expand(head), r._shaped(r.zero_point, w).expand(tail)], dim=1))

    @torch.no_grad()
    def freeze(self) -> None:
        """Quantize the weight once (hard rounding) and cache it; inference never requantizes."""
        self.w_q = self.quantized_weight().detach().clone()
        self.weight_rounding = None

    def unfreeze(self) -> None:
        self.w_q = None

    # -- activations -----------------------------------------------------------------------------
    def enable_split(self, split: int, weights: bool = False) -> None:
        """Give input channels [split:] their own activation quantizer (skip-concat halves) and, with
        `weights`, the weight columns [split:] their own per-output-channel grid (range re-initialised
        on each half). Call before any rounding is learned."""
        if self.act_quantizer is None:
            return
        q = self.act_quantizer
        self.split = split
        self.act_quantizer_split = ActQuantizer(q.bits, q.symmetric, q.unsigned, q.range_init, q.percentile)
        self.act_quantizer_split.mode = q.mode
        if weights:
            w, wq = self.layer.weight.detach(), self.weight_quantizer
            self.weight_quantizer_split = UniformQuantizer(wq.bits, wq.symmetric, 0, wq.unsigned, wq.range_init,
                                                           wq.percentile)
            with torch.no_grad():
                wq.init_range(w[:, :split])
                self.weight_quantizer_split.init_range(w[:, split:])

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.act_quantizer, self.act_quantizer_split) if q is not None]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is None:
            return x
        if self.act_quantizer_split is not None and self.split:
            return torch.cat(
                [self.act_quantizer(x[:, : self.split]), self.act_quantizer_split(x[:, self.split :])], dim=1
            )
        return self.act_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        w = self.quantized_weight() if self.use_weight_quant else self.layer.weight
        if isinstance(self.layer, nn.Conv2d):
            conv = self.layer
            if conv.padding_mode != "zeros":
                raise NotImplementedError("QuantLayer supports zero padding only")
            return F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.linear(x, w, self.layer.bias)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_layers(net: nn.Module, spec: QuantSpec, keep_fp: Iterable[str] = ()) -> list[str]:
    """Swap every Conv2d / Linear of `net` (in place) for a QuantLayer, except names matching
    a `keep_fp` glob pattern. Returns the names kept in floating point."""
    keep_fp = list(keep_fp)
    kept: list[str] = []
    targets = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    for name, module in targets:
        if _matches(name, keep_fp):
            kept.append(name)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, QuantLayer(module, spec))
    return kept


def quant_layers(net: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, m in net.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def act_quantizers(net: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    """Every activation quantizer in the network (layer inputs, attention, ...)."""
    for name, m in net.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def set_act_mode(net: nn.Module, mode: ActMode) -> None:
    for _, q in act_quantizers(net):
        q.mode = mode


def set_weight_quant(net: nn.Module, enabled: bool) -> None:
    for _, layer in quant_layers(net):
        layer.use_weight_quant = enabled


def freeze_weights(net: nn.Module) -> None:
    for _, layer in quant_layers(net):
        layer.freeze()
