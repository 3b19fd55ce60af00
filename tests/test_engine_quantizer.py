"""Uniform quantizer numerics: round trip error, grids, per-timestep parameters."""

from __future__ import annotations

import pytest
import torch

from methods.engine import quantizer
from methods.engine.context import timestep_scope
from methods.engine.quantizer import ActQuantizer, UniformQuantizer


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0])
def test_round_trip_within_half_a_step(bits: int, symmetric: bool, axis: int | None) -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3) * torch.linspace(0.1, 3, 6)[:, None, None, None] + 0.3
    q = UniformQuantizer(bits, symmetric, channel_axis=axis)
    q.init_range(w)
    step = q._shaped(q.scale, w)
    err = (q(w) - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("init", ["minmax", "mse", "percentile"])
def test_codes_stay_on_the_grid(init: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    q = UniformQuantizer(4, channel_axis=0, range_init=init)
    q.init_range(w)
    codes = q.integer(w)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    xq = q(w)
    recon = (codes.float() - q.zero_point[:, None]) * q.scale[:, None]
    assert torch.allclose(xq, recon, atol=1e-6)


def test_mse_init_beats_minmax_on_heavy_tails() -> None:
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((4, 4096))
    errs = {}
    for init in ("minmax", "mse"):
        q = UniformQuantizer(4, channel_axis=0, range_init=init)
        q.init_range(w)
        errs[init] = float((q(w) - w).pow(2).mean())
    assert errs["mse"] < errs["minmax"]


def test_softmax_grid_is_unsigned() -> None:
    q = ActQuantizer(8, symmetric=True, unsigned=True)
    q.mode = "observe"
    p = torch.rand(4, 10).softmax(-1)
    q(p)
    q.finalize()
    assert (q.qmin, q.qmax) == (0, 255)
    assert float((q(p) - p).abs().max()) <= float(q.scale) / 2 + 1e-7


def test_per_timestep_parameters_follow_the_timestep() -> None:
    q = ActQuantizer(8)
    q.mode = "observe"
    for t, amp in ((10, 1.0), (500, 100.0)):
        with timestep_scope(torch.full((3,), t)):
            q(torch.linspace(-amp, amp, 64))
    q.finalize_per_timestep()
    x = torch.linspace(-1, 1, 64)
    with timestep_scope(torch.full((3,), 10)):
        small = (q(x) - x).abs().max()
    with timestep_scope(torch.full((3,), 500)):
        large = (q(x) - x).abs().max()
    assert float(small) < float(large) / 10
    with timestep_scope(torch.full((3,), 7)), pytest.raises(KeyError, match="not calibrated"):
        q(x)


def test_mse_observation_samples_every_batch_uniformly() -> None:
    """The MSE range search sees a uniform sample of ALL observed values: with 64 batches (more than
    the old 16-batch cut) each batch holds about 1/64 of the reservoir, the last ones included."""
    torch.manual_seed(0)
    q = ActQuantizer(8, range_init="mse")
    q.mode = "observe"
    batches, per_batch = 64, 1 << 14  # 4x the reservoir in total
    for b in range(batches):
        q(torch.full((per_batch,), float(b)))
    values, _ = q._samples
    assert values.numel() == quantizer._MAX_OBSERVED
    counts = torch.bincount(values.long(), minlength=batches).float()
    expected = quantizer._MAX_OBSERVED / batches
    # hypergeometric sd ~ sqrt(expected) ~ 64; 6 sd leaves no room for a first-batches-only sample
    assert (counts - expected).abs().max() < 6 * expected**0.5, counts
    q.finalize()
    assert q.mode == "quant" and float(q.scale) > 0


def test_reservoir_keeps_small_observations_whole() -> None:
    q = ActQuantizer(8, range_init="mse")
    q.mode = "observe"
    q(torch.arange(10.0))
    q(torch.arange(10.0, 15.0))
    assert sorted(q._samples[0].tolist()) == [float(v) for v in range(15)]
