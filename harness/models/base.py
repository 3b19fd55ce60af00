"""The model contract every part of the harness talks to: a model is a pipeline.

A `DiffusionModel` bundles a diffusers denoiser network with what the harness needs to sample from
it: the scheduler config, the sample (latent) shape, an optional decoder (latents -> images) and an
optional condition source (class labels or encoded prompts). Methods quantize `model.net` (a copy of
it) and nothing else: the decoder and the text encoder always stay FP. Sampling and metrics call
`denoise(...)`, which hides the call-signature differences of UNet2DModel, UNet2DConditionModel and
DiTTransformer2DModel, and `model.decode(...)`, so nothing downstream special-cases a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from harness.artifacts import tensors_fingerprint
from harness.models.conditions import ClassLabels, ConditionSource, RandomEmbeddings
from harness.models.decoder import Decoder

Family = Literal["unet", "unet_text", "dit"]


@dataclass
class DiffusionModel:
    """A denoiser plus the facts needed to sample from it.

    Conditions (`conditions`, see harness/models/conditions.py):
    - unconditional: `num_classes is None and cond_shape is None`, cond passed as None.
    - class-conditional (`num_classes=K`): cond is a LongTensor of labels in 0..K-1; the label K is
      the classifier-free-guidance null label.
    - text-conditional (`family="unet_text"`): cond is a float tensor (B, *cond_shape) of encoder
      hidden states; the null condition is the encoded empty prompt (zeros only for a random-init
      denoiser without a text encoder).
    - class-conditional through cross-attention (`family="unet_text"`, `conditions` a ClassContext:
      LDM cin256): the condition ids are class labels, but the denoiser sees their learned embedding
      (B, 1, D) like text states, and the null condition is the embedding of the null class. Its
      `num_classes` is None here (no label reaches the denoiser; the source holds the class count),
      so everything that feeds labels to the net (calibration, latency, TIB) treats it as a
      cross-attention model.
    `sample_shape` is what the denoiser sees (latents for latent pipelines); `image_shape` what
    `decode` returns and every metric sees.
    """

    name: str
    family: Family
    net: nn.Module
    scheduler_config: dict
    sample_shape: tuple[int, int, int]
    num_classes: int | None = None
    cond_shape: tuple[int, ...] | None = None
    guidance_scale: float = 1.0
    dataset: str | None = None
    source: str = "built-in"
    extra: dict = field(default_factory=dict)
    decoder: Decoder | None = None
    conditions: ConditionSource | None = None

    def __post_init__(self) -> None:
        if self.conditions is None and self.num_classes is not None:
            self.conditions = ClassLabels(self.num_classes)
        elif self.conditions is None and self.cond_shape is not None:
            self.conditions = RandomEmbeddings(tuple(self.cond_shape))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one decoded image (the sample shape when there is no decoder)."""
        return self.sample_shape if self.decoder is None else self.decoder.image_shape(self.sample_shape)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1] (float32): the FP decoder for latent pipelines, a clamp otherwise."""
        return latents.float().clamp(-1, 1) if self.decoder is None else self.decoder.decode(latents)

    def to(self, device: torch.device | str) -> DiffusionModel:
        """Move every part (denoiser, decoder, text encoder) to `device`; nets stay in eval mode."""
        self.net.to(device).eval()
        if self.decoder is not None:
            self.decoder.net.to(device).eval()
        if self.conditions is not None:
            self.conditions.to(device)
        return self

    def parts_key(self) -> dict[str, Any]:
        """What the pipeline's FP parts besides the denoiser contribute to an artifact's key ({} if none)."""
        key: dict[str, Any] = {}
        if self.decoder is not None:
            key["decoder"] = {**self.decoder.describe(), "weights": tensors_fingerprint(self.decoder.net.state_dict())}
        if self.conditions is not None:
            key["conditions"] = self.conditions.key()
        return key

    def describe(self) -> dict[str, Any]:
        """The pipeline as the run record shows it: what was quantized and what stayed FP."""
        return {
            "source": self.source, **self.extra, "quantized": "denoiser only",
            "sample_shape": list(self.sample_shape), "image_shape": list(self.image_shape),
            "decoder": None if self.decoder is None else {**self.decoder.describe(), "precision": "fp"},
            "conditions": None if self.conditions is None else self.conditions.kind,
        }

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None or self.cond_shape is not None

    def with_net(self, net: nn.Module) -> DiffusionModel:
        """Same model facts, another network (e.g. the quantized copy)."""
        return replace(self, net=net)

    def null_cond(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The condition of the unconditional branch of classifier-free guidance."""
        return None if self.conditions is None else self.conditions.null(batch, device)


def denoise(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """One denoiser call: predicted noise with the shape of `x`, whatever the family.

    `t` is a 1-D LongTensor of timesteps (one per sample). Learned-sigma outputs (DiT) are cut to
    the noise prediction.
    """
    net = model.net
    if model.family == "unet":
        out = net(x, t, class_labels=cond).sample
    elif model.family == "unet_text":
        out = net(x, t, encoder_hidden_states=cond).sample
    elif model.family == "dit":
        out = net(x, timestep=t, class_labels=cond).sample
    else:
        raise ValueError(f"unknown model family {model.family!r}; accepted: unet, unet_text, dit")
    if out.shape[1] != x.shape[1]:
        out = out[:, : x.shape[1]]
    return out
