"""Calibration phases, labelled for torch.profiler and optionally timed.

The engine runs each phase inside `phase(<label>)`: a `torch.profiler.record_function` range (a
no-op unless a profiler runs) and, inside `timing()`, a wall-clock total per label. So
`python -m harness.profile_calibration` splits a method's calibration time into capture of block
inputs / FP targets, forward of the quantized block, regularizer, backward, optimizer step, loss
evaluation and range initialisation without a profiler's overhead, and lists the top ops with one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from torch.profiler import record_function

CAPTURE = "calib/capture"
FORWARD = "calib/forward"
REGULARIZER = "calib/regularizer"
BACKWARD = "calib/backward"
OPTIMIZER = "calib/optimizer"
EVAL = "calib/eval"
RANGE_INIT = "calib/range_init"
ALL = (CAPTURE, FORWARD, REGULARIZER, BACKWARD, OPTIMIZER, EVAL, RANGE_INIT)

_totals: list[dict[str, float]] = []  # the innermost timing() in progress, if any


@contextmanager
def phase(label: str) -> Iterator[None]:
    """Label (and, inside `timing()`, time) one phase; phases do not nest."""
    with record_function(label):
        if not _totals:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            _totals[-1][label] = _totals[-1].get(label, 0.0) + time.perf_counter() - start


@contextmanager
def timing() -> Iterator[dict[str, float]]:
    """Collect the wall seconds of every phase run inside, by label."""
    totals: dict[str, float] = {}
    _totals.append(totals)
    try:
        yield totals
    finally:
        _totals.pop()
