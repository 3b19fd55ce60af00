"""Which class labels the network is evaluating right now.

A cached temporal feature depends on (timestep, label); the module that serves it sits deep in the
network and never sees the label. Like methods/engine/context.py does for the timestep, a forward
pre-hook on the denoiser publishes its `class_labels` argument for the duration of the call.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_current: list[torch.Tensor | None] = [None]


def current_labels() -> torch.Tensor | None:
    """The 1-D label tensor of the denoiser call in progress, or None (unconditional / outside)."""
    return _current[0]


@contextmanager
def label_scope(labels: torch.Tensor | int | None) -> Iterator[None]:
    """Publish `labels` while the block runs (None = no label)."""
    prev = _current[0]
    _current[0] = None if labels is None else torch.as_tensor(labels).flatten().long()
    try:
        yield
    finally:
        _current[0] = prev


def install_label_context(net: nn.Module) -> None:
    """Make every forward call of `net` publish its `class_labels` argument (idempotent)."""
    if getattr(net, "_label_context_installed", False):
        return
    params = list(inspect.signature(net.forward).parameters)
    position = params.index("class_labels") if "class_labels" in params else None
    saved: list[torch.Tensor | None] = []

    def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("class_labels")
        if labels is None and position is not None and len(args) > position:
            labels = args[position]
        saved.append(_current[0])
        _current[0] = None if labels is None else torch.as_tensor(labels).flatten().long()

    def post(_module: nn.Module, _args: tuple, _kwargs: dict, _out: object) -> None:
        _current[0] = saved.pop()

    net.register_forward_pre_hook(pre, with_kwargs=True)
    net.register_forward_hook(post, with_kwargs=True, always_call=True)
    net._label_context_installed = True
