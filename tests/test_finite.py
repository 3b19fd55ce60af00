"""Issue 14.1: non-finite samples fail where they first appear, never become a plausible number."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from harness.config import SamplerConfig
from harness.finite import NonFiniteError, check_finite
from harness.models.base import DiffusionModel
from harness.models.decoder import Decoder
from harness.sampling import sample

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def tiny(channels: int = 1, decoder: Decoder | None = None) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    return DiffusionModel("tiny", "unet", net, SCHED, (channels, 8, 8), decoder=decoder)


def test_check_finite_names_where_and_counts() -> None:
    check_finite(torch.ones(3), "anywhere")
    check_finite(torch.arange(3), "integers are always finite")
    with pytest.raises(NonFiniteError, match=r"at metric fid: 2 of 3 values \(1 NaN, 1 inf\)"):
        check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "metric fid")


def test_a_nan_weight_fails_at_the_first_sampler_step() -> None:
    model = tiny()
    with torch.no_grad():
        model.net.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"sampler step 1/3 \(t=\d+\) of samples 0\.\.1"):
        sample(model, SamplerConfig("ddim", 3, 0.0), 2, 2, seed=0)


def test_the_error_names_the_step_where_inf_first_appears() -> None:
    model, calls = tiny(), []

    def blow_up_on_second_call(_m: torch.nn.Module, _i: tuple, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return out * float("inf") if len(calls) == 2 else out

    model.net.conv_out.register_forward_hook(blow_up_on_second_call)
    cfg = SamplerConfig("ddim", 4, 0.0)
    with pytest.raises(NonFiniteError, match=r"sampler step 2/4 \(t=500\)"):
        sample(model, cfg, 2, 2, seed=0)


def test_non_finite_decoded_images_fail_too() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=1, in_channels=1,
                        out_channels=1, scaling_factor=0.5).eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"decoding samples 0\.\.1 \(the latents were finite\)"):
        sample(tiny(decoder=Decoder("vae", vae)), SamplerConfig("ddim", 2, 0.0), 2, 2, seed=0)
