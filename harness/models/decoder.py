"""The decoder of a latent pipeline: latents -> images in [-1, 1], always in floating point.

Latent diffusion models (LDM, Stable Diffusion, DiT) sample in the latent space of an autoencoder;
every metric, grid and FP reference must see decoded images, so the pipeline decodes before anything
looks at its samples. Methods quantize the denoiser only: the decoder is never handed to them.

Two kinds, as diffusers' own pipelines use them:
- `vae`: AutoencoderKL (SD, DiT's sd-vae-ft-ema/mse): `vae.decode(latents / scaling_factor)`.
- `vqvae`: VQModel (LDM-4/8 from CompVis): `vqvae.decode(latents / scaling_factor)`, which snaps
  the latents to the codebook first (force_not_quantize=False), as diffusers' LDM pipelines do.
The scaling factor is the checkpoint's (`scaling_factor` in its config.json), never a constant here.
A config.json that declares none (CompVis/ldm-celebahq-256's vqvae/ is one: diffusers then fills in
its default 0.18215, the SD VAE's, and decodes garbage; diffusers issue #6725) is completed by the
model config's `decoder_scaling_factor`, which the zoo passes as `scale_override` (harness/models/zoo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.models.modeling_utils import ModelMixin

DecoderKind = Literal["vae", "vqvae"]
DECODER_CLASSES: dict[str, type[ModelMixin]] = {"vae": AutoencoderKL, "vqvae": VQModel}
# Latents decoded per decoder call: a 256 px VAE decode of a whole sampling batch does not fit a GPU.
DECODE_BATCH = 16


@dataclass
class Decoder:
    """An FP autoencoder's decoding half, with the facts a run record needs."""

    kind: DecoderKind
    net: ModelMixin
    scale_override: float | None = None  # only for a checkpoint whose config.json declares no scaling_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.net.config.scaling_factor if self.scale_override is None else self.scale_override)

    @property
    def downscale(self) -> int:
        """Latent-to-image size ratio: each encoder block but the last halves the resolution."""
        return 2 ** (len(self.net.config.block_out_channels) - 1)

    def image_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The decoded image shape of latents of `latent_shape` (C, H, W)."""
        _, h, w = latent_shape
        return int(self.net.config.out_channels), h * self.downscale, w * self.downscale

    def check(self, latent_shape: tuple[int, int, int], image_shape: tuple[int, int, int], where: str) -> None:
        """A decoder that does not fit the denoiser's latents or the configured image shape fails at load."""
        latent_ch = int(self.net.config.latent_channels)
        if latent_ch != latent_shape[0]:
            raise ValueError(f"the {self.kind} from {where} takes {latent_ch}-channel latents, but the denoiser's "
                             f"model.sample_shape={list(latent_shape)}; fix model.sample_shape or model.path")
        decoded = self.image_shape(latent_shape)
        if tuple(image_shape) != decoded:
            raise ValueError(f"the {self.kind} from {where} decodes {list(latent_shape)} latents to {list(decoded)} "
                             f"images, but model.image_shape={list(image_shape)}; fix model.image_shape")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (N, C, h, w) -> float32 images (N, C', H, W) clamped to [-1, 1], on the latents' device."""
        device = next(self.net.parameters()).device
        dtype = next(self.net.parameters()).dtype
        out = []
        for chunk in latents.split(DECODE_BATCH):
            z = chunk.to(device, dtype) / self.scaling_factor
            out.append(self.net.decode(z).sample.float().to(latents.device))
        return torch.cat(out).clamp(-1, 1)

    def describe(self) -> dict[str, object]:
        # The source is named only when overridden, so existing artifact keys (which include this) stay valid.
        source = {} if self.scale_override is None else {"scaling_factor_from": "model.decoder_scaling_factor"}
        return {"kind": self.kind, "class": type(self.net).__name__, "scaling_factor": self.scaling_factor, **source,
                "params": sum(p.numel() for p in self.net.parameters())}
