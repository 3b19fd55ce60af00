"""Progress bars that leave no debris in logs: every bar of the harness and the methods is made here.

On a terminal a bar redraws in place; written to a file or a pipe (a sweep's log, SLURM, CI) its
carriage-return frames interleave with log lines, so there the bar is off (tqdm's `disable=None`:
off when the stream is not a TTY). `disable=True` still turns a bar off everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
MIN_INTERVAL = 0.5  # seconds between redraws on a terminal


def progress_bar(iterable: Iterable[T] | None = None, *, disable: bool = False, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, drawn only where stderr is a terminal (and `disable` is not set)."""
    kwargs.setdefault("mininterval", MIN_INTERVAL)
    return tqdm(iterable, disable=True if disable else None, **kwargs)
