"""From a fake-quant `QuantLayer` to the integers a real kernel consumes.

The fake-quant network stores dequantized values: the frozen weight `w_q = (q - z) * s` and, per
activation quantizer, (s, z) or one (s, z) per timestep. Backends need the integer codes back. Codes
are re-centred so every grid fits a signed byte: an unsigned b-bit grid [0, 2^b - 1] becomes
[-2^(b-1), 2^(b-1) - 1] with its zero point moved by the same offset, which leaves
`(code - zero_point) * scale` (the only thing the maths needs) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.engine.context import current_timestep
from methods.engine.modules import QuantLayer
from methods.engine.quantizer import ActQuantizer, UniformQuantizer

MAX_INT_BITS = 8


def centring_offset(q: UniformQuantizer) -> int:
    """What to subtract from q's codes so its grid is signed and centred (0 for signed grids)."""
    return 0 if q.qmin < 0 else 2 ** (q.bits - 1)


@dataclass
class IntWeight:
    """A quantized weight as centred int8 codes: value = (codes - zero_point[o]) * scale[o]."""

    codes: torch.Tensor  # int8, the weight's shape (O, I[, kh, kw])
    scale: torch.Tensor  # (O,) float32
    zero_point: torch.Tensor  # (O,) int32, centred
    bits: int

    @property
    def symmetric(self) -> bool:
        return not bool(self.zero_point.any())

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        return (self.codes.float() - self.zero_point.reshape(shape).float()) * self.scale.reshape(shape)

    def in_channels(self, start: int, stop: int) -> IntWeight:
        """The slice of input channels [start, stop) (one split-quantized input group)."""
        return IntWeight(self.codes[:, start:stop].contiguous(), self.scale, self.zero_point, self.bits)


def integer_weight(layer: QuantLayer) -> IntWeight:
    """The integer codes of the layer's (frozen) quantized weight.

    Raises when the weight is not on its quantizer's grid (a method that changed `w_q` without
    updating the quantizer), because an integer kernel would then compute another network.
    """
    q = layer.weight_quantizer
    if q.bits > MAX_INT_BITS:
        raise ValueError(f"integer backends run weight bits 2..{MAX_INT_BITS}, layer has {q.bits}")
    with torch.no_grad():
        w = layer.quantized_weight().detach().float()
        out = w.shape[0]
        scale = q.scale.detach().float().flatten().expand(out).clone()
        zp = q.zero_point.detach().float().flatten().expand(out).clone()
        shape = (-1,) + (1,) * (w.dim() - 1)
        codes = torch.clamp(torch.round(w / scale.reshape(shape)) + zp.reshape(shape), q.qmin, q.qmax)
        err = ((codes - zp.reshape(shape)) * scale.reshape(shape) - w).abs().amax()
        if float(err) > 1e-3 * float(scale.min()):
            raise ValueError(
                f"quantized weight is off its quantizer's grid by {float(err):.3g} (scale {float(scale.min()):.3g}); "
                "the method must keep weight_quantizer.scale/zero_point consistent with w_q"
            )
    off = centring_offset(q)
    return IntWeight((codes - off).to(torch.int8), scale, (zp - off).round().to(torch.int32), q.bits)


@dataclass
class InputGroup:
    """Input channels [start, stop) of a layer and the activation quantizer that covers them."""

    start: int
    stop: int
    quantizer: ActQuantizer


def input_groups(layer: QuantLayer) -> list[InputGroup] | None:
    """The layer's quantized input channel groups (two with a split skip-concat), or None when the
    input is not quantized (a32, or a quantizer left off because calibration never reached it)."""
    inner = layer.layer
    channels = inner.in_channels if isinstance(inner, nn.Conv2d) else inner.in_features
    main = layer.act_quantizer
    if main is None or main.mode != "quant":
        return None
    split = layer.act_quantizer_split
    if split is None or not layer.split:
        return [InputGroup(0, channels, main)]
    if split.mode != "quant":
        return None
    if not isinstance(inner, nn.Conv2d):
        raise ValueError("split input quantization is defined for convolutions (skip concat channels)")
    return [InputGroup(0, layer.split, main), InputGroup(layer.split, channels, split)]


def act_params(q: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) the fake quantizer would use right now: per timestep when it has them."""
    if q.per_timestep:
        return q.timestep_params(current_timestep())
    return q.scale.reshape(()), q.zero_point.reshape(())


def quantize_codes(q: ActQuantizer, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                   shift: int = 0) -> torch.Tensor:
    """Integer codes (as float, minus `shift`) of `x`, exactly as the fake quantizer rounds.

    The codes are read back from the fake quantizer's own output ((code - z) * s, which `/ s` and
    `round` invert exactly), so they agree with whatever arithmetic the engine uses (x / s, or the
    fused x * (1 / s) kernel): a value on a rounding boundary goes the same way in both models.
    """
    return torch.round(q.quantize_with(x, scale, zp) / scale) + (zp - shift)
