"""Data-parallel evaluation inside one run, under torchrun: each rank samples its shard of the eval seeds.

    torchrun --nproc_per_node 4 run.py method=tfmq eval=paper

Every rank runs the same run: loading, calibration data and quantization are deterministic, so each
rank gets the same quantized model without any broadcast. The eval set is split into contiguous
shards aligned to `eval.batch_size`; a rank samples its shard (the noise and labels of sample i are
a pure function of (seed, i), harness/sampling.py) and extracts its shard's features, and
`all_gather_object` hands the parts to every rank in rank order, so the gathered images and every
metric equal a single-process run's (same batches, same noise). Rank 0 alone writes artifacts, the
record, the grid and W&B, holds the file locks and decides for all ranks whether a record is finished
or an artifact cached, so all ranks take the same path through the collectives.

Device per rank: `cuda:LOCAL_RANK` (nccl) when CUDA is available, else the CPU (gloo). Without
torchrun (WORLD_SIZE unset or 1) every function here is the plain single-process one.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import fields
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from harness.config import SamplerConfig
from harness.locks import hold
from harness.metrics import features as feats
from harness.models.base import DiffusionModel
from harness.sampling import Samples, StepCallback
from harness.sampling import sample as sample_one

if TYPE_CHECKING:
    from harness.artifacts import ArtifactCache

log = logging.getLogger(__name__)
T = TypeVar("T")
# Ranks wait in a collective while rank 0 waits for another job's artifact lock or writes the record:
# far longer than gloo's 30-minute default can be normal (a paper-recipe calibration built elsewhere).
TIMEOUT_S = float(os.environ.get("DIFFPTQ_DIST_TIMEOUT_S", 6 * 3600))


def init_from_env() -> bool:
    """Join torchrun's process group (env:// rendezvous) when WORLD_SIZE > 1; True when in one."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
        backend = "nccl"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=TIMEOUT_S))
    # A process group left to interpreter teardown can abort (SIGABRT) in gloo's destructor.
    atexit.register(_shutdown)
    log.info("rank %d of %d (%s, device %s)", rank(), world_size(), backend, local_device())
    return True


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes (artifacts, records, grids, W&B)."""
    return rank() == 0


def local_device() -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def from_main(value: T) -> T:
    """Rank 0's `value` on every rank: decisions that read the filesystem (is a record finished?)
    must be the same on all ranks, or they would leave the collectives in different places."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, batch_size: int, r: int, world: int) -> tuple[int, int]:
    """(start, count) of rank r's contiguous part of n items: whole batches of `batch_size`, so each
    rank computes exactly the batches a single process would (bit-identical results on one device)."""
    n_batches = -(-n // batch_size)
    lo, hi = n_batches * r // world, n_batches * (r + 1) // world
    start = min(n, lo * batch_size)
    return start, min(n, hi * batch_size) - start


def _shards(work: Callable[[], T] | None) -> list[T]:
    """Run this rank's shard (`work`; None for an empty shard) and gather every rank's result in rank
    order. An error on any rank is raised on every rank, so no rank waits in the gather for a failed
    one and all ranks record the same failure."""
    part: Any = None
    try:
        part = work() if work is not None else None
    except Exception as err:  # noqa: BLE001 - sent to every rank, raised below
        part = err
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, part)
    for p in parts:
        if isinstance(p, Exception):
            raise p
    return [p for p in parts if p is not None]


def sample(model: DiffusionModel, sampler: SamplerConfig, n: int, batch_size: int, seed: int,
           n_trajectory: int = 0, on_step: StepCallback | None = None, desc: str = "sampling") -> Samples:
    """harness.sampling.sample over the ranks: each samples its shard, every rank gets all n samples."""
    if not active():
        return sample_one(model, sampler, n, batch_size, seed, n_trajectory, on_step, desc)
    start, count = shard(n, batch_size, rank(), world_size())
    parts = _shards((lambda: sample_one(model, sampler, count, batch_size, seed, n_trajectory, on_step,
                                        f"{desc} [rank {rank()}]", offset=start)) if count else None)

    def cat(name: str, dim: int = 0) -> torch.Tensor | None:
        rows = [getattr(p, name) for p in parts if getattr(p, name) is not None]
        return torch.cat(rows, dim=dim) if rows else None

    # Every per-sample field is concatenated in rank order; a trajectory is (steps, samples, ...).
    per_sample = {f.name: cat(f.name, dim=1 if f.name == "trajectory" else 0) for f in fields(Samples)
                  if f.name != "timesteps"}
    return Samples(timesteps=parts[0].timesteps, **per_sample)


def images_to_features(extractor: feats.FeatureExtractor, images: torch.Tensor, batch_size: int = 250,
                       progress: bool = True, desc: str | None = None) -> feats.Features:
    """harness.metrics.features.images_to_features over the ranks (each extracts its shard)."""
    if not active():
        return feats.images_to_features(extractor, images, batch_size, progress, desc)
    start, count = shard(len(images), batch_size, rank(), world_size())
    return feats.Features.cat(_shards(
        (lambda: feats.images_to_features(extractor, images[start : start + count], batch_size, progress, desc))
        if count else None))


def collective_get_or_build(cache: ArtifactCache, kind: str, deps: Mapping[str, Any],
                            build: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """ArtifactCache.get_or_build for a torchrun job: rank 0 holds the lock and decides; when the
    artifact is missing every rank runs `build` (its sampling and features are sharded collectives)
    and rank 0 alone stores it; when it exists every rank loads it (the cache must be on a filesystem
    all ranks see, as torchrun's ranks on one node do)."""
    with hold(cache.path(kind, deps).with_suffix(".lock"), cache.lock_mode, f"artifact {kind}"):
        cached = cache.load(kind, deps) if is_main() else None
        if from_main(cached is not None):
            cached = cached if cached is not None else cache.load(kind, deps)
            if cached is None:
                raise RuntimeError(f"rank {rank()} cannot read artifact {cache.path(kind, deps)} that rank 0 read: "
                                   "paths.artifacts must be a folder every rank sees")
            log.info("artifact %s: cached (%s)", kind, cache.path(kind, deps))
            return cached
        return cache.build_and_store(kind, deps, build, write=is_main())


class _MainWrites:
    """A results store whose writes happen on rank 0 only; reads pass through on every rank."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def write(self, record: Any) -> Any:
        return self._store.write(record) if is_main() else self._store.path(record.run_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def main_writes(store: T) -> T:
    """`store` itself in a single process; under torchrun a view of it that only rank 0 writes to."""
    return _MainWrites(store) if active() else store  # type: ignore[return-value]
