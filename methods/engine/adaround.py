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

    The weight quantizer's (scale, zero point) stay fixed; only `alpha` is learned.
    """

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        self.quantizer = layer.weight_quantizer  # qmin / qmax (a split grid has the same bits)
        self.grid = layer.weight_grid
        self.hard = False
        w = layer.layer.weight.detach()
        scale, _ = self.grid(w)
        rest = w / scale - torch.floor(w / scale)
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
        scale, zp = self.grid(w)
        offset = (self.alpha >= 0).to(w.dtype) if self.hard else self.soft()
        q = torch.clamp(torch.floor(w / scale) + offset + zp, self.quantizer.qmin, self.quantizer.qmax)
        return (q - zp) * scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Sum over weights of 1 - |2h - 1|^beta (zero once every h is 0 or 1); the caller applies lambda."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()


def freeze_layer(layer: QuantLayer) -> None:
    """Switch a layer's AdaRound (if any) to hard rounding and cache the quantized weight."""
    if isinstance(layer.weight_rounding, AdaRound):
        layer.weight_rounding.hard = True
    layer.freeze()
