"""Content-addressed, atomic, checksummed cache of shared tensors (safetensors).

Calibration trajectories, FP reference samples, FP temporal features and dataset reference
statistics are computed once and reused by every run of a sweep and across sweeps. The key is a hash
of everything the value depends on (spelled out in the sidecar JSON); the file is written to a temp
name and renamed, so parallel runs never read half a file; a build holds a lock keyed by the
content address (harness/locks.py), so parallel jobs build it once and the others load it; its
sha256 is checked on every load, and a truncated or corrupted file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from harness.atomic import file_sha256, make_shareable, remove_stale_tmp
from harness.locks import hold

log = logging.getLogger(__name__)
BUILDS_LOG = "builds.log"


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of canonical JSON (sorted keys): the same inputs give the same key on any machine."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hash of named tensors' bytes (e.g. a state_dict): identifies model weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        make_shareable(tmp)  # mkstemp's 0600 would lock a shared cache to its first writer
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ArtifactCache:
    """`get_or_build(kind, deps, build)` returns cached tensors or builds and stores them."""

    def __init__(self, root: str | Path, lock_mode: str = "os", stale_tmp_after: float | None = None) -> None:
        self.root = Path(root)
        remove_stale_tmp(self.root, stale_tmp_after, recursive=True)  # left by writers killed mid-write
        self.lock_mode = lock_mode  # harness/locks.py: os (flock) | nfs (lease file)
        self.builds: list[str] = []  # kinds this process built (not loaded): the run report's artifact_builds

    def path(self, kind: str, deps: Mapping[str, Any]) -> Path:
        return self.root / kind / f"{stable_hash({'kind': kind, **deps})}.safetensors"

    def load(self, kind: str, deps: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when missing or failing their checksum."""
        path = self.path(kind, deps)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("sha256") != file_sha256(path):
                log.warning("artifact %s fails its checksum (truncated or corrupted); rebuilding", path)
                return None
            return load_file(str(path))
        except (OSError, ValueError, json.JSONDecodeError) as err:
            log.warning("artifact %s unreadable (%s); rebuilding", path, err)
            return None

    def store(self, kind: str, deps: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
        path = self.path(kind, deps)
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        _atomic_write_bytes(path, lambda tmp: save_file(flat, str(tmp)))
        meta = {"kind": kind, "deps": deps, "sha256": file_sha256(path), "keys": sorted(flat)}
        _atomic_write_bytes(path.with_suffix(".json"),
                            lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str)))
        return path

    def get_or_build(self, kind: str, deps: Mapping[str, Any],
                     build: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Cached tensors, or built once across parallel jobs: the builder holds the artifact's lock
        (keyed by its content address) and waiters re-check the cache when they get it, then load."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from harness.distributed import collective_get_or_build  # torchrun: ranks build together

            return collective_get_or_build(self, kind, deps, build)
        cached = self.load(kind, deps)
        if cached is not None:
            log.info("artifact %s: cached (%s)", kind, self.path(kind, deps))
            return cached
        with hold(self.path(kind, deps).with_suffix(".lock"), self.lock_mode, f"artifact {kind}"):
            cached = self.load(kind, deps)
            if cached is not None:
                log.info("artifact %s: built by another job while this one waited", kind)
                return cached
            return self.build_and_store(kind, deps, build)

    def build_and_store(self, kind: str, deps: Mapping[str, Any], build: Callable[[], Mapping[str, torch.Tensor]],
                        write: bool = True) -> dict[str, torch.Tensor]:
        """Build, store (unless `write` is False: a torchrun rank other than 0) and count the build in
        `<root>/builds.log`, one JSON line per build, so parallel sweeps can show nothing was built twice."""
        log.info("artifact %s: building", kind)
        start = time.perf_counter()
        tensors = dict(build())
        if not write:
            return tensors
        where = self.store(kind, deps, tensors)
        self.builds.append(kind)
        line = {"kind": kind, "path": str(where), "seconds": round(time.perf_counter() - start, 3),
                "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}
        with (self.root / BUILDS_LOG).open("a") as f:  # one short append per build: no interleaving
            f.write(json.dumps(line) + "\n")
        log.info("artifact %s: stored at %s", kind, where)
        return tensors
