"""File hygiene shared by the results store and the artifact cache: permissions, stale temp files and
content hashes.

Both write to a temp file from `tempfile.mkstemp` and rename it over the target. mkstemp creates
files with mode 0600, which breaks a store shared by a group on a cluster, so a finished file gets
the mode a plain `open()` would have given it (0666 minus the umask). A writer killed between the
temp write and the rename leaves its `*.tmp` behind; the next process that opens the folder removes
temp files older than a bound (young ones may belong to a writer that is still running).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

STALE_TMP_ENV = "HARNESS_STALE_TMP_SECONDS"
DEFAULT_STALE_TMP_SECONDS = 3600.0


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is a set-and-get)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path: str | os.PathLike[str]) -> None:
    """Give a mkstemp file the mode `open()` would: 0666 & ~umask (0644 or 0664 usually)."""
    os.chmod(path, 0o666 & ~current_umask())


def stale_tmp_seconds() -> float:
    """Age after which a temp file is taken as left by a killed writer: $HARNESS_STALE_TMP_SECONDS or 1 h."""
    raw = os.environ.get(STALE_TMP_ENV)
    if raw is None:
        return DEFAULT_STALE_TMP_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"<${STALE_TMP_ENV}={raw}> must be a number of seconds") from None
    if value < 0:
        raise ValueError(f"<${STALE_TMP_ENV}={raw}> must be >= 0 seconds")
    return value


def stale_tmp_files(root: Path, max_age: float, recursive: bool = False) -> list[Path]:
    """Temp files (`.*.tmp`, as our writers name them) under `root` older than `max_age` seconds."""
    if not root.is_dir():
        return []
    now = time.time()
    found = root.rglob(".*.tmp") if recursive else root.glob(".*.tmp")
    stale = []
    for path in found:
        try:
            if path.is_file() and now - path.stat().st_mtime >= max_age:
                stale.append(path)
        except OSError:  # removed by another process meanwhile
            continue
    return sorted(stale)


def remove_stale_tmp(root: Path, max_age: float | None = None, recursive: bool = False) -> list[Path]:
    """Delete stale temp files under `root`; returns what was removed (logged, never raises)."""
    removed = []
    for path in stale_tmp_files(root, stale_tmp_seconds() if max_age is None else max_age, recursive):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        removed.append(path)
        log.info("removed stale temp file %s (%d bytes) left by an interrupted writer", path, size)
    return removed


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in blocks (artifacts, prompt files, checkpoints)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
