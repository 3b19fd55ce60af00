"""AdaRound: learned roundings are valid roundings (floor or ceil), start at round-to-nearest."""

from __future__ import annotations

import torch
from torch import nn

from methods.engine.adaround import AdaRound, freeze_layer
from methods.engine.modules import QuantLayer, QuantSpec
from methods.engine.quantizer import UniformQuantizer
from methods.engine.reconstruction import rounding_state

torch.set_num_threads(1)


def _layer(bits: int = 3) -> QuantLayer:
    torch.manual_seed(0)
    return QuantLayer(nn.Conv2d(4, 6, 3), QuantSpec(bits, None))


def _codes(layer: QuantLayer, w_q: torch.Tensor) -> torch.Tensor:
    s = layer.weight_quantizer.scale.detach().reshape(-1, 1, 1, 1)
    return w_q / s


def test_init_is_fp_when_soft_and_nearest_when_hard() -> None:
    layer = _layer()
    rounding = AdaRound(layer)
    assert layer.weight_rounding is rounding
    w = layer.layer.weight
    grid = torch.floor(_codes(layer, w)) + layer.weight_quantizer.zero_point.reshape(-1, 1, 1, 1)
    inside = (grid >= 0) & (grid + 1 <= 7)  # away from the clamp at the ends of the 3-bit grid
    soft = layer.quantized_weight()
    assert torch.allclose(soft[inside], w[inside], atol=1e-5)  # h(alpha) = fractional part
    rounding.hard = True
    assert torch.allclose(layer.quantized_weight(), layer.weight_quantizer(w), atol=1e-6)


def test_trained_rounding_is_floor_or_ceil() -> None:
    layer = _layer()
    rounding = AdaRound(layer)
    opt = torch.optim.Adam([rounding.alpha], lr=0.1)
    x = torch.randn(8, 4, 6, 6)
    target = layer.layer(x).detach() + 0.3 * torch.randn(8, 6, 4, 4)  # pull away from nearest
    for it in range(60):
        loss = (layer(x) - target).pow(2).mean() + 0.01 * rounding.regularizer(20.0 - 0.3 * it)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = layer.layer.weight.detach()
    nearest = layer.weight_quantizer(w)
    freeze_layer(layer)
    assert layer.weight_rounding is None and layer.w_q is not None
    codes = _codes(layer, layer.w_q)
    scaled = _codes(layer, w)
    zp = layer.weight_quantizer.zero_point.reshape(-1, 1, 1, 1)
    lo = torch.clamp(torch.floor(scaled) + zp, 0, 7) - zp
    hi = torch.clamp(torch.floor(scaled) + 1 + zp, 0, 7) - zp
    valid = torch.isclose(codes, lo, atol=1e-4) | torch.isclose(codes, hi, atol=1e-4)
    assert bool(valid.all())
    assert not torch.allclose(layer.w_q, nearest)  # it learned something other than nearest


def test_regularizer_vanishes_on_binary_rounding() -> None:
    rounding = AdaRound(_layer())
    start = float(rounding.regularizer(2.0).detach())
    with torch.no_grad():
        rounding.alpha.copy_(torch.where(rounding.alpha >= 0, 10.0, -10.0))
    assert start > 0
    assert float(rounding.regularizer(2.0).detach()) == 0.0


def test_rounding_state_counts_undecided_and_flipped_variables() -> None:
    rounding = AdaRound(_layer())
    total = rounding.alpha.numel()
    start = rounding_state([rounding])
    assert start["rounding_vars"] == total and start["flipped_fraction"] == 0.0, "init is round-to-nearest"
    assert start["soft_fraction"] == 1.0, "every h starts at the fractional part, strictly inside (0, 1)"
    with torch.no_grad():
        rounding.alpha.copy_(torch.where(rounding.alpha >= 0, -10.0, 10.0))  # decided, all flipped
        rounding.alpha[0].fill_(0.0)  # one output channel undecided (h = 0.5), rounding up
    state = rounding_state([rounding])
    per_channel = total // rounding.alpha.shape[0]
    assert state["soft_fraction"] == per_channel / total
    assert state["flipped_fraction"] == (total - int(rounding.nearest()[0].sum())) / total
    assert rounding_state([]) == {"rounding_vars": 0}


def test_split_weight_grid_quantizes_each_input_half_on_its_own_grid() -> None:
    """Q-Diffusion's split: the skip half of the input channels gets its own per-channel weight grid,
    and AdaRound rounds on that grid (hard rounding at init = round-to-nearest on the split grid)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        conv.weight[:, 3:] *= 20  # the skip half spans a much wider range
    layer = QuantLayer(conv, QuantSpec(4, 8))
    w = conv.weight.detach()
    shared = layer.quantized_weight().detach().clone()
    layer.enable_split(3, weights=True)
    split = layer.quantized_weight().detach()
    head = UniformQuantizer(4, channel_axis=0)
    head.init_range(w[:, :3])
    assert torch.allclose(split[:, :3], head(w[:, :3]))
    err = lambda q: float((q[:, :3] - w[:, :3]).abs().mean())  # noqa: E731
    assert err(split) < err(shared) / 5, "the narrow half is no longer rounded on the wide grid"
    rounding = AdaRound(layer)
    rounding.hard = True
    assert torch.allclose(layer.quantized_weight(), split, atol=1e-6)
    only_acts = QuantLayer(conv, QuantSpec(4, 8))
    only_acts.enable_split(3)
    assert only_acts.weight_quantizer_split is None and torch.allclose(only_acts.quantized_weight(), shared)
