"""Scale-out: Hydra launchers across runs, torchrun inside a run, compute-once under concurrency.

Every test starts real processes (the launchers' own workers, torchrun's ranks); nothing is mocked.
Runs are tiny (4 sampler steps, a handful of samples) so the cost is mostly interpreter start-up.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.artifacts import BUILDS_LOG, ArtifactCache
from harness.distributed import shard
from harness.locks import make_lock

ROOT = Path(__file__).resolve().parents[1]
# Tiny runs that still touch every shared artifact: calibration, FP samples, FP temporal features.
TINY = ["model=tiny_unet", "eval=smoke", "logger=none", "sampler.steps=4", "calibration.n_samples=4",
        "eval.latency.batch_sizes=[1]", "eval.latency.warmup=0", "eval.latency.iters=1"]


def _env() -> dict[str, str]:
    # One thread per process: the test runs several at once on a small machine, and equal thread
    # counts keep float reductions identical between the 1-process and the 2-rank evaluation.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"}


def _paths(tmp: Path) -> list[str]:
    return [f"paths.store={tmp / 'store'}", f"paths.artifacts={tmp / 'artifacts'}", f"paths.outputs={tmp / 'out'}",
            f"hydra.sweep.dir={tmp / 'sweep'}", f"hydra.run.dir={tmp / 'run'}"]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:])
    return proc


def _records(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(store.glob("*.json"))]


def _builds(artifacts: Path) -> list[str]:
    log = artifacts / BUILDS_LOG
    return [json.loads(line)["kind"] for line in log.read_text().splitlines()] if log.exists() else []


# ---- compute once: the lock around an artifact build --------------------------------------------

def _slow_build_worker(root: str, mode: str, out: mp.Queue) -> None:
    def build() -> dict[str, torch.Tensor]:
        time.sleep(1.0)  # long enough that every worker arrives while the first still builds
        return {"x": torch.arange(10.0) * os.getpid()}

    out.put(ArtifactCache(root, lock_mode=mode).get_or_build("demo", {"n": 10}, build)["x"].tolist())


@pytest.mark.parametrize("mode", ["os", "nfs"])
def test_parallel_processes_build_an_artifact_once(tmp_path: Path, mode: str) -> None:
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_slow_build_worker, args=(str(tmp_path), mode, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert _builds(tmp_path) == ["demo"], "four processes, one build"
    assert all(r == results[0] for r in results), "the waiters load what the builder wrote"


@pytest.mark.parametrize("mode", ["os", "nfs"])
def test_lock_of_a_killed_job_is_recovered(tmp_path: Path, mode: str) -> None:
    cache = ArtifactCache(tmp_path, lock_mode=mode)
    lock_path = cache.path("demo", {}).with_suffix(".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from harness.locks import make_lock; "
         f"lock = make_lock(sys.argv[1], {mode!r}); lock.acquire(); print('held', flush=True); time.sleep(600)",
         str(lock_path)],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):  # filelock.Timeout is a TimeoutError: the holder really holds it
            make_lock(lock_path, mode).acquire(timeout=0.2)
    finally:
        holder.send_signal(signal.SIGKILL)  # a job killed by the scheduler: no cleanup runs
        holder.wait()
    start = time.monotonic()
    got = cache.get_or_build("demo", {}, lambda: {"x": torch.ones(2)})
    assert torch.equal(got["x"], torch.ones(2)) and _builds(tmp_path) == ["demo"]
    assert time.monotonic() - start < 30, "a dead holder's lock is taken over promptly"


def test_shards_are_whole_batches_covering_every_sample() -> None:
    for n, bs, world in [(10, 4, 2), (8, 2, 2), (3, 4, 2), (1000, 250, 3)]:
        parts = [shard(n, bs, r, world) for r in range(world)]
        assert parts[0][0] == 0 and sum(c for _, c in parts) == n
        for (s0, c0), (s1, _) in zip(parts, parts[1:], strict=False):
            assert s0 + c0 == s1 and s1 % bs == 0


# ---- launchers across runs ----------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "plugin", "cls"), [
    ("local_parallel", "hydra_joblib_launcher", "JoblibLauncher"),
    ("slurm", "hydra_submitit_launcher", "SlurmLauncher"),
    ("local_submitit", "hydra_submitit_launcher", "LocalLauncher"),
    ("local_ray", "hydra_ray_launcher", "RayLauncher"),
])
def test_launcher_presets_compose(preset: str, plugin: str, cls: str) -> None:
    """Each preset extends its plugin's config and names a launcher class that exists; the SLURM
    preset asks for one GPU per job and requeues on timeout (sbatch itself is not run here)."""
    pytest.importorskip(f"hydra_plugins.{plugin}")
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == cls
    if preset == "local_parallel":
        assert launcher.n_jobs == int(os.environ.get("DIFFPTQ_N_JOBS", 2)) > 0
    if preset == "slurm":
        assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.max_num_timeout > 0
    if preset == "local_ray":
        assert launcher.ray.init._node_ip_address == "127.0.0.1"


def test_joblib_sweep_builds_shared_artifacts_once(tmp_path: Path) -> None:
    """Four runs on two joblib workers need the same calibration data, FP samples and FP temporal
    features, and the same FP reference run: each is computed once."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = _run([sys.executable, "run.py", "-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2",
                 *TINY, "method=rtn", "bits=w8a8,w4a8,w8a32,w4a32", *_paths(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _records(tmp_path / "store")
    assert sorted((r["method"], r["status"]) for r in records) == [("fp", "finished")] + [("rtn", "finished")] * 4
    assert sorted(_builds(tmp_path / "artifacts")) == ["calibration", "fp_samples", "fp_temporal_features"]
    assert sum(len(r["report"]["artifact_builds"]) for r in records) == 3, "the records say who built what"
    ledger = [json.loads(line) for line in (tmp_path / "sweep" / "runs.jsonl").read_text().splitlines()]
    fp = sorted(e["outcome"] for e in ledger if "/fp/" in e["label"])
    assert fp == ["finished", "resumed", "resumed", "resumed"], "one job computed the FP reference, three resumed it"
    where = [r["environment"]["placement"] for r in records]
    assert {w["launcher"] for w in where} == {"JoblibLauncher"}
    assert len({w["pid"] for w in where}) == 2, "two worker processes shared the runs"


def test_submitit_local_sweep_survives_a_failing_job(tmp_path: Path) -> None:
    """Each run in its own process through submitit (the SLURM code path without SLURM); a job that
    fails leaves a failed record and the other job finishes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = _run([sys.executable, "run.py", "-m", "hydra/launcher=local_submitit", *TINY, "method=rtn",
                 "bits=w8a8", "fp_reference=false", "sampler.steps=4,0", *_paths(tmp_path)])
    records = {r["config"].get("sampler", {}).get("steps"): r for r in _records(tmp_path / "store")}
    assert records[4]["status"] == "finished", proc.stderr[-2000:]
    assert records[0]["status"] == "failed" and "sampler.steps=0" in records[0]["error"]
    assert records[4]["environment"]["placement"]["launcher"] == "LocalLauncher"
    assert (tmp_path / "sweep" / ".submitit").is_dir(), "submitit's job folders (logs, pickles) are there"


@pytest.mark.slow  # a ray cluster start costs tens of seconds; ray is not in the test extra
def test_ray_local_cluster_sweep(tmp_path: Path) -> None:
    """Runs as ray tasks on a local cluster bound to 127.0.0.1, sharing the artifacts."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher.ray_launcher",
                        reason="hydra-ray-launcher not installed (pip install -e '.[ray]')")
    proc = _run([sys.executable, "run.py", "-m", "hydra/launcher=local_ray", *TINY, "method=rtn",
                 "bits=w8a8,w4a8", *_paths(tmp_path)], timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = _records(tmp_path / "store")
    assert sorted((r["method"], r["status"]) for r in records) == [("fp", "finished")] + [("rtn", "finished")] * 2
    assert {r["environment"]["placement"]["launcher"] for r in records} == {"RayLauncher"}
    assert sorted(_builds(tmp_path / "artifacts")) == ["calibration", "fp_samples", "fp_temporal_features"]


# ---- torchrun inside a run ----------------------------------------------------------------------

def test_torchrun_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """A 2-rank evaluation gives the single process's FP samples, grid images and every metric."""
    overrides = ["model=ddpm_mnist", "eval=smoke", "eval.extractor=lenet", "eval.n_samples=16", "eval.batch_size=4",
                 "eval.grid=16", "logger=none", "sampler.steps=4", "calibration.n_samples=4", "method=rtn",
                 "bits=w8a8", "eval.latency.batch_sizes=[1]", "eval.latency.warmup=0", "eval.latency.iters=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.Popen([sys.executable, "run.py", *overrides, *_paths(one)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000), "run.py", *overrides, *_paths(two)])
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-2000:]
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    recs = {d.name: {r["method"]: r for r in _records(d / "store")} for d in (one, two)}
    assert set(recs["one"]) == set(recs["two"]) == {"rtn", "fp"}
    for method in ("rtn", "fp"):
        a, b = recs["one"][method], recs["two"][method]
        assert a["run_id"] == b["run_id"] and a["status"] == b["status"] == "finished"
        assert b["environment"]["placement"]["world_size"] == 2 and b["environment"]["placement"]["torchrun"]
        timing = ("latency", "ms_per", "peak_memory", "calib_seconds")  # measured, differ between any two runs
        quality = {k for k in a["metrics"] if not k.startswith(timing)}
        assert {"fid", "psnr_vs_fp"} & quality and quality == {k for k in b["metrics"] if k in quality}
        for k in quality:
            assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-5, abs=1e-6), k
        grid = Path("out") / a["run_id"] / "grid.png"
        assert (one / grid).read_bytes() == (two / grid).read_bytes(), "the same images"
    (path,) = (one / "artifacts" / "fp_samples").glob("*.safetensors")
    a, b = load_file(str(path)), load_file(str(two / "artifacts" / "fp_samples" / path.name))
    assert set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert _builds(two / "artifacts").count("fp_samples") == 1, "rank 0 alone writes"


def test_torchrun_error_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    """A shard that fails on rank 1 must not leave rank 0 waiting in the gather: both raise it."""
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "from harness import distributed\n"
        "distributed.init_from_env()\n"
        "try:\n"
        "    distributed._shards(lambda: 1 / (distributed.rank() - 1))\n"  # rank 1 divides by zero
        "except ZeroDivisionError:\n"
        # one write per line: both ranks share the pipe, and print's text and newline could interleave
        "    import sys\n"
        "    decided = distributed.from_main(distributed.rank())\n"
        "    sys.stdout.write(f'rank {distributed.rank()} raised; rank 0 decided {decided}\\n')\n"
        "    sys.stdout.flush()\n")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", str(30500 + os.getpid() % 1000), str(script)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("rank 0 raised; rank 0 decided 0", "rank 1 raised; rank 0 decided 0"):
        assert proc.stdout.count(line) == 1, proc.stdout
