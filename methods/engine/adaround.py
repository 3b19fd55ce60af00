"""AdaRound: learn whether each weight rounds down or up, instead of rounding to nearest.

w_q = s * (clamp(floor(w / s) + h(alpha) + z, qmin, qmax) - z), h(alpha) = clamp(sigmoid(alpha) *
(zeta - gamma) + gamma, 0, 1) (the rectified sigmoid, gamma = -0.1, zeta = 1.1). `alpha` starts where
h equals the fractional part of w / s, so the soft weight starts at the FP weight and hard rounding
at init is round-to-nearest. The regularizer sum(1 - |2h - 1|^beta) pushes h to 0 or 1 as beta is
annealed; `hard` uses the decision (alpha >= 0) so the result is always floor or ceil of w / s.
"""

from __future__ import annotations

import torch
from torch import nn

from methods.engine.modules import QuantLayer

GAMMA = -0.1
ZETA = 1.1


class AdaRound(nn.Module):
    """Learnable rounding of one QuantLayer's weight; attaches itself as `layer.weight_rounding`.

    The weight and the weight quantizer's (scale, zero point) stay fixed; only `alpha` is learned.
    So the grid and floor(w / s) are computed once here, not in every forward of the reconstruction
    loop (the same values, bit for bit).
    """

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.quantizer = layer.weight_quantizer  # qmin / qmax (a split grid has the same bits)
        self.hard = False
        w = layer.layer.weight.detach()
        scale, zp = layer.weight_grid(w)
        self.register_buffer("_scale", scale.detach().clone())
        self.register_buffer("_zero_point", zp.detach().clone())
        self.register_buffer("_floor", torch.floor(w / scale))
        rest = w / scale - self._floor
        self.register_buffer("_nearest", (rest >= 0.5).float())
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        layer.weight_rounding = self

    def nearest(self) -> torch.Tensor:
        """The rounding offset (0 / 1) of round-to-nearest on the same grid, for comparison."""
        return self._nearest

    def soft(self) -> torch.Tensor:
        """h(alpha) in [0, 1]: the learned rounding offset."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The rounded weight; `w` must be the layer's weight this AdaRound was built on."""
        if w.shape != self._floor.shape:
            raise ValueError(f"AdaRound built for a weight of shape {tuple(self._floor.shape)}, got {tuple(w.shape)}")
        offset = (self.alpha >= 0).to(w.dtype) if self.hard else self.soft()
        q = torch.clamp(self._floor + offset + self._zero_point, self.quantizer.qmin, self.quantizer.qmax)
        return (q - self._zero_point) * self._scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Sum over weights of 1 - |2h - 1|^beta (zero once every h is 0 or 1); the caller applies lambda."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()


def freeze_layer(layer: QuantLayer) -> None:
    """Switch a layer's AdaRound (if any) to hard rounding and cache the quantized weight."""
    if isinstance(layer.weight_rounding, AdaRound):
        layer.weight_rounding.hard = True
    layer.freeze()
