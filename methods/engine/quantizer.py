"""Uniform affine quantizers: the one numeric primitive every method shares.

x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s

Weights: per-output-channel, range from min-max, an Lp-error search over shrunk ranges (p = 2.4, as
in BRECQ / Q-Diffusion) or a percentile. Activations: per-tensor, statistics gathered over
calibration batches ("observe" mode), optionally one (scale, zero point) per timestep value (TFMQ's
finite set calibration). Rounding uses a straight-through estimator and the step size can be made
learnable (LSQ), so reconstruction can train through the quantizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from methods.engine.context import current_timestep

RangeInit = Literal["minmax", "mse", "percentile"]
ActMode = Literal["off", "observe", "quant"]

LP_NORM = 2.4
_MSE_GRID = 80
_MAX_OBSERVED = 1 << 18


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with an identity gradient."""
    return (x.round() - x).detach() + x


def check_bits(bits: int, key: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"<{key}={bits}> must be an integer in 2..16 (2..8 for real integer backends)")
    return bits


class UniformQuantizer(nn.Module):
    """Fake quantizer with per-tensor or per-channel (scale, zero point).

    `symmetric=True` uses a signed grid with z = 0 (or the unsigned grid [0, 2^b - 1] when
    `unsigned=True`, for non-negative inputs such as softmax outputs).
    """

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        channel_axis: int | None = None,
        unsigned: bool = False,
        range_init: RangeInit = "minmax",
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.unsigned = unsigned
        self.channel_axis = channel_axis
        self.range_init: RangeInit = range_init
        self.percentile = percentile
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("initialized", torch.tensor(False))

    # -- grid -------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric and not self.unsigned else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric and not self.unsigned else 2**self.bits - 1

    def params_from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) that cover [lo, hi] (always including 0)."""
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        if self.symmetric:
            bound = hi if self.unsigned else torch.maximum(hi, -lo)
            scale = bound / self.qmax
            zp = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            zp = torch.round(-lo / scale.clamp_min(1e-12)) + self.qmin
        return scale.clamp_min(1e-8), zp

    def quantize_with(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        if scale.numel() == 1 and not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
            # Inference: z is an integer, so (clamp(round(x/s) + z, qmin, qmax) - z) * s equals
            # clamp(round(x * (1/s)), qmin - z, qmax - z) * s: four vectorised passes, three in place.
            # (torch.fake_quantize_per_tensor_affine gives the same values but was ~10x slower on CPU.)
            z = float(zp.reshape(()))
            y = x * (1.0 / scale.reshape(()))
            return y.round_().clamp_(self.qmin - z, self.qmax - z).mul_(scale.reshape(()))
        q = torch.clamp(round_ste(x / scale) + zp, self.qmin, self.qmax)
        return (q - zp) * scale

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes of `x` (for real integer backends), as int32."""
        scale, zp = self._shaped(self.scale, x), self._shaped(self.zero_point, x)
        return torch.clamp(torch.round(x / scale) + zp, self.qmin, self.qmax).int()

    def _shaped(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None or v.numel() == 1:
            return v.reshape(())
        shape = [1] * like.dim()
        shape[self.channel_axis] = -1
        return v.reshape(shape)

    # -- range init -------------------------------------------------------------------------------
    def _reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channel_axis is None:
            return x.min().reshape(1), x.max().reshape(1)
        flat = x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values

    def _channels_flat(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_axis is None:
            return x.reshape(1, -1)
        return x.transpose(0, self.channel_axis).reshape(x.shape[self.channel_axis], -1)

    @torch.no_grad()
    def init_range(self, x: torch.Tensor) -> None:
        """Set (scale, zero point) from a tensor (the weight, or observed activations)."""
        x = x.detach().float()
        if self.range_init == "percentile":
            flat = self._channels_flat(x)
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=x.device)
            bounds = torch.quantile(flat, q, dim=1)
            lo, hi = bounds[0], bounds[1]
        else:
            lo, hi = self._reduce(x)
        scale, zp = self.params_from_range(lo, hi)
        if self.range_init == "mse":
            scale, zp = self._mse_search(x, lo, hi)
        self.set_params(scale, zp)

    def _mse_search(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the min-max range by factors in (0, 1], keep the Lp-best per channel."""
        flat = self._channels_flat(x)
        best_err = torch.full((flat.shape[0],), float("inf"), device=x.device)
        best_s, best_z = self.params_from_range(lo, hi)
        for i in range(_MSE_GRID):
            alpha = 1.0 - i / (_MSE_GRID + 20)
            s, z = self.params_from_range(lo * alpha, hi * alpha)
            xq = self.quantize_with(flat, s[:, None], z[:, None])
            err = (xq - flat).abs().pow(LP_NORM).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        return best_s, best_z

    def set_params(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        self.scale.data = scale.detach().clone().float().flatten()
        self.zero_point = zp.detach().clone().float().flatten()
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            raise RuntimeError("quantizer used before its range was set (call init_range or calibrate)")
        return self.quantize_with(x, self._shaped(self.scale, x), self._shaped(self.zero_point, x))

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        axis = "tensor" if self.channel_axis is None else f"channel{self.channel_axis}"
        return f"bits={self.bits}, {kind}, per-{axis}, init={self.range_init}"


class ActQuantizer(UniformQuantizer):
    """Per-tensor activation quantizer calibrated on observed activations.

    Modes: "off" passes through; "observe" passes through and records statistics (global and per
    timestep value); "quant" fake-quantizes with the global parameters or, after
    `finalize_per_timestep`, with the parameters of the current timestep (finite set calibration).
    """

    def __init__(self, bits: int, symmetric: bool = False, unsigned: bool = False,
                 range_init: RangeInit = "minmax", percentile: float = 99.99) -> None:
        super().__init__(bits, symmetric, None, unsigned, range_init, percentile)
        self.mode: ActMode = "off"
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self._samples: list[torch.Tensor] = []  # the reservoir: [values, keys] once something was observed
        self._per_t: dict[int, tuple[float, float]] = {}
        self.register_buffer("ts_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("ts_scale", torch.zeros(0))
        self.register_buffer("ts_zero_point", torch.zeros(0))

    @property
    def per_timestep(self) -> bool:
        return self.ts_keys.numel() > 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        lo, hi = x.min(), x.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if self.range_init != "minmax":
            self._reservoir_add(x.flatten())
        try:
            t = current_timestep()
        except (RuntimeError, ValueError):
            return
        old = self._per_t.get(t)
        lo_f, hi_f = float(lo), float(hi)
        self._per_t[t] = (lo_f, hi_f) if old is None else (min(old[0], lo_f), max(old[1], hi_f))

    def _reservoir_add(self, flat: torch.Tensor) -> None:
        """Keep a uniform sample of at most _MAX_OBSERVED of all elements observed so far, whatever
        the number of batches: every element gets a uniform random key and the reservoir holds the
        elements with the smallest keys (reservoir sampling by priorities, vectorised). Calibration
        rows are often ordered by timestep, so keeping the first batches would drop the last steps.
        The reservoir is a set (its users take min, max, quantiles or a mean), so topk need not sort:
        unsorted it is 3-4x faster on CPU and keeps the same elements."""
        keys = torch.rand(flat.numel(), device=flat.device)
        if flat.numel() > _MAX_OBSERVED:  # at most _MAX_OBSERVED of this batch can survive
            keys, idx = torch.topk(keys, _MAX_OBSERVED, largest=False, sorted=False)
            flat = flat[idx]
        if self._samples:
            old_values, old_keys = self._samples
            flat = torch.cat([old_values, flat.to(old_values.device)])
            keys = torch.cat([old_keys, keys.to(old_keys.device)])
        if flat.numel() > _MAX_OBSERVED:
            keys, idx = torch.topk(keys, _MAX_OBSERVED, largest=False, sorted=False)
            flat = flat[idx]
        self._samples = [flat, keys]

    @torch.no_grad()
    def finalize(self) -> None:
        """Turn the observed statistics into global parameters and switch to "quant"."""
        if self._lo is None:
            raise RuntimeError("activation quantizer observed no data; was the layer reached in calibration?")
        if self.range_init == "minmax" or not self._samples:
            self.set_params(*self.params_from_range(self._lo.reshape(1), self._hi.reshape(1)))
        else:
            self.init_range(self._samples[0].to(self.scale.device))
        self._samples = []
        self.mode = "quant"

    @torch.no_grad()
    def finalize_per_timestep(self) -> None:
        """Finite set calibration: one (scale, zero point) per observed timestep, by min-max."""
        if not self._per_t:
            raise RuntimeError("no per-timestep statistics: observe inside denoiser calls first")
        keys = sorted(self._per_t)
        lo = torch.tensor([self._per_t[k][0] for k in keys])
        hi = torch.tensor([self._per_t[k][1] for k in keys])
        scale, zp = self.params_from_range(lo, hi)
        dev = self.scale.device
        self.ts_keys = torch.tensor(keys, dtype=torch.long, device=dev)
        self.ts_scale = scale.to(dev)
        self.ts_zero_point = zp.to(dev)
        if not bool(self.initialized):
            self.finalize()
        self.mode = "quant"

    def reset_observations(self) -> None:
        self._lo = self._hi = None
        self._samples = []
        self._per_t = {}

    def timestep_params(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(self.ts_keys == t)
        if idx.numel() == 0:
            raise KeyError(
                f"timestep {t} was not calibrated: finite set calibration covered timesteps "
                f"{self.ts_keys.tolist()}; sample with the same sampler schedule as calibration"
            )
        i = int(idx[0, 0])
        return self.ts_scale[i], self.ts_zero_point[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observe(x)
            return x
        if self.per_timestep:
            scale, zp = self.timestep_params(current_timestep())
            return self.quantize_with(x, scale, zp)
        return super().forward(x)

    def extra_repr(self) -> str:
        fsc = f", per-timestep={self.ts_keys.numel()}" if self.per_timestep else ""
        return super().extra_repr() + f", mode={self.mode}{fsc}"
