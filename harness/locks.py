"""Cross-process file locks that make shared work happen once when jobs run in parallel.

Parallel jobs of a sweep (joblib workers, SLURM array tasks, ray actors) need the same artifacts and
the same FP reference record. Each is guarded by a lock file next to it, keyed by its content
address (artifacts) or run id (records): the first job builds, the others wait and then load.

Two modes, chosen by `paths.lock_mode` (presentation only, never part of a run's identity):

- `os` (default): `filelock.FileLock`, an flock(2) lock. The kernel releases it when the holder dies
  (kill -9, OOM killer, SLURM preemption), so a killed job never leaves a stale lock. Works on local
  disks and on shared filesystems that support flock (NFSv4, Lustre and GPFS mounted with locking).
- `nfs`: `filelock.SoftFileLease`, a marker file the holder refreshes by a heartbeat. Needs only
  atomic exclusive create, so it works where flock does not (NFSv3 without lockd, some FUSE mounts).
  A killed holder stops refreshing; peers take the lease over once it has not been refreshed for
  `NFS_LEASE_SECONDS` (and at once when the holder's pid is gone on the same host).

Overlap after a takeover is harmless here: artifacts and records are written atomically and a
rebuild computes the same bytes, so a lock only saves duplicated work, it never guards correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed
from filelock import BaseFileLock, FileLock, SoftFileLease, Timeout

log = logging.getLogger(__name__)

LOCK_MODES = ("os", "nfs")
NFS_LEASE_SECONDS = 60.0  # a lease not refreshed for this long belongs to a dead job


def make_lock(path: str | Path, mode: str = "os") -> BaseFileLock:
    """The lock object for `path` in `mode` (see the module docstring)."""
    if mode not in LOCK_MODES:
        raise ValueError(f"<paths.lock_mode={mode}> is not a lock mode; accepted: {', '.join(LOCK_MODES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "nfs":
        return SoftFileLease(str(path), lease_duration=NFS_LEASE_SECONDS)
    return FileLock(str(path))


@contextmanager
def hold(path: str | Path, mode: str = "os", what: str = "") -> Iterator[None]:
    """Hold the lock at `path`, logging when another job holds it (so a wait is never silent).

    In a torchrun job only rank 0 locks (harness/distributed.py): the other ranks follow rank 0's
    decisions through collectives, and waiting here for rank 0 would deadlock them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        yield
        return
    lock = make_lock(path, mode)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another job holds %s", what or path, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
