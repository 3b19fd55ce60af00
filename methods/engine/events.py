"""Progress events from the engine (e.g. reconstruction losses) to whoever listens, such as a live W&B run.

The engine must not depend on any sink, and a run with no listener must not pay for the events, so
this is a plain module-level list of callbacks: `emit` returns at once when it is empty. A callback
that raises is dropped with a warning instead of failing the quantization that emitted the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Callback = Callable[..., None]  # callback(kind, **values)
_subscribers: list[Callback] = []


def subscribe(callback: Callback) -> Callable[[], None]:
    """Call `callback(kind, **values)` on every event until the returned function is called."""
    _subscribers.append(callback)

    def unsubscribe() -> None:
        if callback in _subscribers:
            _subscribers.remove(callback)

    return unsubscribe


def emit(kind: str, **values: Any) -> None:
    """Send one event; free when nobody listens. Kinds: "recon_iter" (block, iter, loss, weights, acts)
    every few optimisation steps, "recon_block" (block, before, after, weights, acts: the losses before
    and after) when a block is done; `weights` / `acts` count what was learned (the reconstruction phase)."""
    if not _subscribers:
        return
    for callback in list(_subscribers):
        try:
            callback(kind, **values)
        except Exception as err:  # noqa: BLE001 - a listener must never fail the engine
            log.warning("event listener %r failed on %s and was removed: %s: %s",
                        callback, kind, type(err).__name__, err)
            if callback in _subscribers:
                _subscribers.remove(callback)
