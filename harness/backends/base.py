"""The backend contract: turn a method's quantized model into something that executes.

`BACKENDS.get(name)(cfg).prepare(qmodel, spec)` returns a `DiffusionModel` whose `.net` is called by
`harness.models.base.denoise` exactly like the diffusers net (same signature, returns an object with
`.sample`); `.describe()` says what really ran (kernel, device), so a latency number is never
separated from the code path that produced it. `spec is None` means the FP model (method fp).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from harness.metrics.latency import cpu_info
from harness.models.base import DiffusionModel
from harness.registry import Registry
from methods.engine.modules import QuantSpec


@dataclass
class DenoiserOutput:
    """What a diffusers denoiser returns, as far as `denoise` cares."""

    sample: torch.Tensor


class ExternalNet(nn.Module, ABC):
    """A denoiser executed outside PyTorch, callable like a diffusers net.

    Accepts the three diffusers call styles (`net(x, t, class_labels=...)`,
    `net(x, t, encoder_hidden_states=...)`, `net(x, timestep=t, class_labels=...)`); a scalar
    timestep is broadcast to the batch, as diffusers does.
    """

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | None = None,
                class_labels: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                return_dict: bool = True, **_: Any) -> DenoiserOutput | tuple[torch.Tensor]:
        if timestep is None:
            raise TypeError("the denoiser needs a timestep")
        t = torch.as_tensor(timestep).flatten().long()
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        cond = class_labels if class_labels is not None else encoder_hidden_states
        out = self.run(sample, t, cond)
        return DenoiserOutput(out) if return_dict else (out,)

    @abstractmethod
    def run(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """Predicted model output for a batch (x, t of shape (B,), cond or None)."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_info()['model']})"


def net_device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Backend(ABC):
    """Base class: validates the backend's config group (conf/backend/<name>.yaml) against its
    `defaults` and keeps what `describe()` reports."""

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Mapping[str, Any] | None = None) -> None:
        cfg = dict(cfg or {})
        cfg.pop("name", None)
        for key in cfg:
            if key not in self.defaults:
                close = difflib.get_close_matches(key, list(self.defaults), n=1)
                hint = f" Did you mean backend.{close[0]}?" if close else ""
                accepted = ", ".join(sorted(self.defaults)) or "none"
                raise ValueError(f"backend.{key} is not a key of backend {self.name}; accepted: {accepted}.{hint}")
        self.cfg = {**self.defaults, **cfg}
        self._description: dict[str, Any] = {}

    @abstractmethod
    def prepare(self, qmodel: DiffusionModel, spec: QuantSpec | None) -> DiffusionModel:
        """An executable copy of `qmodel` (the input is not modified)."""

    def describe(self) -> dict[str, Any]:
        """Backend name, the kernel that actually ran, the device, and backend-specific facts."""
        if not self._description:
            raise RuntimeError(f"backend {self.name}: describe() is available after prepare()")
        return {"backend": self.name, **self._description}


BACKENDS: Registry[type[Backend]] = Registry("backend")
