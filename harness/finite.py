"""One error for non-finite numbers, shared by sampling, features and metrics.

A NaN or inf anywhere in the pipeline must fail the run, never turn into a plausible-looking number
(a NaN image clamps and casts to a constant uint8 image whose FID is 0): every stage that produces
tensors checks them with `check_finite` and the message says where the values first appeared.
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Non-finite values (NaN / inf) appeared; the message names where first."""


def check_finite(t: torch.Tensor, where: str) -> None:
    """Raise NonFiniteError naming `where` (e.g. "sampler step 12/50 (t=741)") if `t` holds NaN or inf."""
    if t.is_floating_point() or t.is_complex():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            n_nan = int(torch.isnan(t).sum())
            n_bad = int(bad.sum())
            raise NonFiniteError(f"non-finite values first appeared at {where}: "
                                 f"{n_bad} of {t.numel()} values ({n_nan} NaN, {n_bad - n_nan} inf)")
