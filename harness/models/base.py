"""The model contract every part of the harness talks to.

A `DiffusionModel` bundles a diffusers denoiser network with what the harness needs to sample from
it: the scheduler config, the sample shape and the kind of condition it takes. Methods quantize
`model.net` (a copy of it); sampling and metrics call `denoise(...)`, which hides the call-signature
differences of UNet2DModel, UNet2DConditionModel and DiTTransformer2DModel.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

Family = Literal["unet", "unet_text", "dit"]


@dataclass
class DiffusionModel:
    """A denoiser plus the facts needed to sample from it.

    Conditions:
    - unconditional: `num_classes is None and cond_shape is None`, cond passed as None.
    - class-conditional (`num_classes=K`): cond is a LongTensor of labels in 0..K-1; the label K is
      the classifier-free-guidance null label.
    - text-conditional (`family="unet_text"`): cond is a float tensor (B, *cond_shape) of encoder
      hidden states; the null condition is all zeros.
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
        if self.num_classes is not None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if self.cond_shape is not None:
            return torch.zeros((batch, *self.cond_shape), device=device)
        return None


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
