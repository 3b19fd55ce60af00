"""Which timestep the network is evaluating right now.

Per-timestep quantization parameters (TFMQ's finite set calibration, cached temporal features) need
the timestep inside layers that never see it. A forward pre-hook on the denoiser reads the timestep
argument and publishes it here for the duration of the call, so no diffusers code is patched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_current: list[torch.Tensor | None] = [None]


def current_timesteps() -> torch.Tensor | None:
    """The 1-D timestep tensor of the denoiser call in progress, or None outside a call."""
    return _current[0]


def current_timestep() -> int:
    """The single timestep of the call in progress; raises when the batch mixes timesteps."""
    t = _current[0]
    if t is None:
        raise RuntimeError("no timestep in context: per-timestep quantizers run only inside a denoiser call")
    if t.numel() > 1 and not bool((t == t.flatten()[0]).all()):
        raise ValueError(
            "per-timestep quantization needs one timestep per batch, got "
            f"{sorted(set(t.flatten().tolist()))}; group calibration batches by timestep"
        )
    return int(t.flatten()[0])


@contextmanager
def timestep_scope(t: torch.Tensor | int) -> Iterator[None]:
    """Publish `t` as the current timestep(s) while the block runs."""
    prev = _current[0]
    _current[0] = torch.as_tensor(t).flatten().long()
    try:
        yield
    finally:
        _current[0] = prev


def _timestep_arg(args: tuple, kwargs: dict) -> torch.Tensor | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    return torch.as_tensor(t).flatten().long()


def install_timestep_context(net: nn.Module) -> None:
    """Make every forward call of `net` publish its timestep argument (idempotent)."""
    if getattr(net, "_timestep_context_installed", False):
        return
    saved: list[torch.Tensor | None] = []

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        saved.append(_current[0])
        _current[0] = _timestep_arg(args, kwargs)

    def post(_module: nn.Module, _args: tuple, _kwargs: dict, _out: object) -> None:
        _current[0] = saved.pop()

    net.register_forward_pre_hook(pre, with_kwargs=True)
    net.register_forward_hook(post, with_kwargs=True, always_call=True)
    net._timestep_context_installed = True
