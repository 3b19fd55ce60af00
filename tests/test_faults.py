"""Fault suite (issue 14): faults injected as a hostile user would, on tiny models, each in its own store.

Kills are real SIGKILLs of forked workers (during calibration, sampling, an artifact write, a store
write); files are really truncated or edited; the NaN and truncated models are real checkpoints; two
real `python run.py -m` sweeps share one store. The full disk is SIMULATED: the write functions are
replaced by ones raising ENOSPC (filling a real disk is not something a test may do). Every test adds
to a tally (runs attempted, faults injected, records lost, wrong records written) that the last test
prints and checks: nothing lost, nothing fake.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import harness.artifacts
import harness.store
from harness import tracking
from harness.aggregate.cli import aggregate
from harness.aggregate.frame import records_frame
from harness.aggregate.render import to_markdown
from harness.aggregate.table import LOAD_MARK, LOAD_NOTE, make_table
from harness.models.zoo import load_model
from harness.runner import run
from harness.store import ResultsStore, RunRecord
from harness.store import main as store_main

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")
# The smallest run that still goes through every phase: calibration, quantization, sampling, metrics.
FAST = ["model=tiny_unet", "eval=smoke", "logger=none", "method=rtn", "bits=w8a8", "fp_reference=false",
        "sampler.steps=2", "calibration.n_samples=2", "calibration.batch_size=2", "eval.n_samples=4",
        "eval.batch_size=4", "eval.n_trajectory=1", "eval.temporal=false", "eval.latency.batch_sizes=[1]",
        "eval.latency.warmup=0", "eval.latency.iters=1", "eval.grid=4", "method.recipes.quick.calib_rows=4"]
TALLY = {"runs attempted": 0, "faults injected": 0, "records lost": 0, "wrong records written": 0}


def _paths(root: Path) -> list[str]:
    return [f"paths.store={root / 'store'}", f"paths.artifacts={root / 'artifacts'}", f"paths.outputs={root / 'out'}"]


def _run(root: Path, *overrides: str) -> RunRecord:
    TALLY["runs attempted"] += 1
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*FAST, *_paths(root), *overrides])
    return run(cfg, ledger=root / "runs.jsonl")


def _fault(n: int = 1) -> None:
    TALLY["faults injected"] += n


def audit(store_dir: Path, keep: Iterable[RunRecord] = (), must_fail: Iterable[str] = ()) -> None:
    """Count what a fault cost: a finished record in `keep` that is gone or no longer finished is
    lost; a record that fails its checksum, a finished one with a non-finite metric or without its
    metrics, or a finished one for a run that had to fail, is wrong."""
    store = ResultsStore(store_dir)
    for path in store_dir.glob("*.json"):
        try:
            harness.store.parse_record(path.read_text())
        except ValueError:
            TALLY["wrong records written"] += 1
    records = {r.run_id: r for r in store.records()}
    for old in keep:
        now = records.get(old.run_id)
        TALLY["records lost"] += int(now is None or not now.finished)
    for r in records.values():
        if r.finished and (not r.metrics or not all(math.isfinite(v) for v in r.metrics.values())
                           or "latency_ms" not in r.metrics or r.run_id in set(must_fail)):
            TALLY["wrong records written"] += 1


def _clone(baseline: Path, dest: Path, artifacts: bool = True) -> Path:
    shutil.copytree(baseline / "store", dest / "store")
    if artifacts:
        shutil.copytree(baseline / "artifacts", dest / "artifacts")
    return dest


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterable[None]:
    """Tiny models run single-threaded: on a shared, loaded machine torch's two spinning threads made a
    0.4 s run take 30 s. The subprocesses get OMP_NUM_THREADS=1 for the same reason."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunRecord]:
    """One finished run and its artifacts; tests copy them into their own folders."""
    root = tmp_path_factory.mktemp("baseline")
    rec = _run(root)
    assert rec.finished, rec.traceback
    return root, rec


# --- background processes: started first, checked by the last tests, overlapping the in-process ones

KILL_WORKER = textwrap.dedent('''
    """Forks one child per fault; each child SIGKILLs itself at the injected point (fork after imports,
    before any torch work, so the children start warm and safely)."""
    import json, os, shutil, signal, sys, traceback
    from pathlib import Path
    import torch
    from hydra import compose, initialize_config_dir
    import harness.artifacts
    from harness.runner import Phases, run

    root, conf, fast = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

    def cfg(d, *extra):
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            return compose(config_name="config", overrides=[*fast, f"paths.store={d / 'store'}",
                           f"paths.artifacts={d / 'artifacts'}", f"paths.outputs={d / 'out'}", *extra])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def kill_in_phase(target, after):
        """SIGKILL at the `after`-th module forward inside phase `target`: mid-phase, not at its edge."""
        orig = Phases.__call__
        def patched(self, name, message, *args):
            if name == target:
                count = [0]
                def hook(module, inputs, output):
                    count[0] += 1
                    if count[0] >= after:
                        die()
                torch.nn.modules.module.register_module_forward_hook(hook)
            return orig(self, name, message, *args)
        Phases.__call__ = patched

    def kill_mid_artifact_write():
        orig = harness.artifacts.save_file
        def half(tensors, path):
            orig(tensors, path)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            die()
        harness.artifacts.save_file = half

    def kill_mid_store_write(store):
        orig = os.replace
        def replace(src, dst):
            if Path(dst).parent == store and '"status": "finished"' in Path(src).read_text():
                die()
            return orig(src, dst)
        os.replace = replace

    def child(fn):
        pid = os.fork()
        if pid == 0:
            try:
                fn()
            except BaseException:
                traceback.print_exc()
                os._exit(2)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)

    base = root / "baseline"
    def baseline():
        assert run(cfg(base)).finished
    out = {"baseline": child(baseline)}

    def scenario(name, store=True, artifacts=True):
        d = root / name
        if store:
            shutil.copytree(base / "store", d / "store")
        if artifacts:
            shutil.copytree(base / "artifacts", d / "artifacts")
        return d

    d = scenario("calibration", store=False)
    out["calibration"] = child(lambda: (kill_in_phase("quantize", 3), run(cfg(d))))
    d = scenario("sampling")
    out["sampling"] = child(lambda: (kill_in_phase("sampling", 50), run(cfg(d, "force=true"))))
    d = scenario("artifact_write", artifacts=False)
    out["artifact_write"] = child(lambda: (kill_mid_artifact_write(), run(cfg(d, "force=true"))))
    d = scenario("store_write")
    out["store_write"] = child(lambda: (kill_mid_store_write(d / "store"), run(cfg(d, "force=true"))))
    print(json.dumps(out))
''')


@dataclass
class Background:
    root: Path
    kills: subprocess.Popen
    sweeps: list[subprocess.Popen]


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory) -> Iterable[Background]:
    """The kill worker and two concurrent sweeps on one store, running while the in-process tests do."""
    root = tmp_path_factory.mktemp("background")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    kills = subprocess.Popen([sys.executable, "-c", KILL_WORKER, str(root / "kills"), CONF, json.dumps(FAST)],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shared = root / "shared"
    sweeps = [subprocess.Popen(
        [sys.executable, "run.py", "-m", "method.weight_init=minmax,bogus", *FAST, *_paths(shared),
         f"hydra.sweep.dir={root / f'sweep{i}'}", "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    TALLY["runs attempted"] += 5 + 4  # worker: baseline + 4 killed runs; sweeps: 2 jobs each
    yield Background(root, kills, sweeps)
    for p in (kills, *sweeps):
        if p.poll() is None:
            p.kill()
            p.wait()


# --- in-process faults

def test_corrupt_artifact_is_reported_and_rebuilt(background, baseline, tmp_path: Path) -> None:
    """(Asks for `background` only to start it first: its processes overlap the in-process tests.)"""
    root, rec = baseline
    _clone(root, tmp_path)
    calib = next((tmp_path / "artifacts").glob("calibration*/*.safetensors"))
    calib.write_bytes(calib.read_bytes()[:-100])  # truncated, as by a crash or a full disk
    _fault()
    assert store_main(["verify", "--store", str(tmp_path / "store"), "--artifacts", str(tmp_path / "artifacts")]) == 1
    again = _run(tmp_path, "force=true")
    assert again.finished, again.traceback
    assert store_main(["verify", "--store", str(tmp_path / "store"), "--artifacts", str(tmp_path / "artifacts")]) == 0
    audit(tmp_path / "store", keep=[rec])


def test_corrupt_record_is_reported_never_tabulated_and_recomputed(baseline, tmp_path: Path) -> None:
    root, rec = baseline
    _clone(root, tmp_path)
    path = tmp_path / "store" / f"{rec.run_id}.json"
    data = json.loads(path.read_text())
    data["metrics"]["latency_ms"] = 0.001  # a flattering hand edit that keeps the old checksum
    path.write_text(json.dumps(data, indent=1))
    _fault()
    assert store_main(["verify", "--store", str(tmp_path / "store")]) == 1
    with pytest.warns(UserWarning, match="checksum mismatch"):
        written = aggregate(tmp_path / "store", tmp_path / "tables")
    assert written == [], "the edited record must not reach a table"
    again = _run(tmp_path)  # unreadable = not finished: the run is recomputed, the edited file set aside
    assert again.finished and again.metrics["latency_ms"] != 0.001
    assert list((tmp_path / "store").glob("*.json.corrupt-*")), "the edited file is kept as evidence"
    audit(tmp_path / "store", keep=[rec])


def _tiny_checkpoint(folder: Path) -> Path:
    tiny = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "model" / "tiny_unet.yaml"))
    load_model(tiny).net.save_pretrained(folder, safe_serialization=True)
    return folder / "diffusion_pytorch_model.safetensors"


def test_nan_model_fails_and_never_reaches_a_table(baseline, tmp_path: Path) -> None:
    root, rec = baseline
    _clone(root, tmp_path)
    weights = _tiny_checkpoint(tmp_path / "nan_model")
    tensors = load_file(weights)
    tensors["conv_out.weight"].view(-1)[0] = float("nan")  # one NaN weight
    save_file(tensors, weights)
    _fault()
    bad = _run(tmp_path, "model.init=pretrained", f"+model.path={tmp_path / 'nan_model'}")
    assert bad.status == "failed" and "non-finite" in bad.error, bad.error
    written = aggregate(tmp_path / "store", tmp_path / "tables")
    table = (tmp_path / "tables" / "quality.md").read_text()
    assert written and table.count("RTN") == 1 and "nan" not in table.lower(), table
    audit(tmp_path / "store", keep=[rec], must_fail=[bad.run_id])


def test_missing_tensors_fail_the_load_naming_them(baseline, tmp_path: Path) -> None:
    root, rec = baseline
    _clone(root, tmp_path)
    weights = _tiny_checkpoint(tmp_path / "cut_model")
    tensors = load_file(weights)
    dropped = sorted(tensors)[:3]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, weights)
    _fault()
    bad = _run(tmp_path, "model.init=pretrained", f"+model.path={tmp_path / 'cut_model'}")
    assert bad.status == "failed" and "missing" in bad.error and dropped[0] in bad.error, bad.error
    audit(tmp_path / "store", keep=[rec], must_fail=[bad.run_id])


def test_full_disk_simulated_keeps_the_finished_record(baseline, tmp_path: Path, monkeypatch) -> None:
    """SIMULATED full disk: the artifact write, then the record write, raise ENOSPC."""
    root, rec = baseline
    _clone(root, tmp_path, artifacts=False)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(harness.artifacts, "save_file", enospc)
    _fault()
    failed = _run(tmp_path, "force=true")
    assert failed.status == "failed" and "No space left" in failed.error
    kept = ResultsStore(tmp_path / "store").get(rec.run_id)
    assert kept.finished and kept.metrics == rec.metrics and "No space left" in kept.attempts[-1]["error"]
    monkeypatch.undo()
    shutil.copytree(root / "artifacts", tmp_path / "artifacts", dirs_exist_ok=True)
    monkeypatch.setattr(harness.store.os, "fsync", enospc)  # the record write itself fails
    _fault()
    failed = _run(tmp_path, "force=true")
    monkeypatch.undo()
    assert failed.status == "failed" and failed.error.startswith("record not written: OSError")
    assert ResultsStore(tmp_path / "store").get(rec.run_id).metrics == rec.metrics
    assert not list((tmp_path / "store").glob(".*.tmp")), "a failed write removes its temp file"
    audit(tmp_path / "store", keep=[rec])


def test_unreachable_wandb_falls_back_offline_after_the_record(baseline, tmp_path: Path, monkeypatch) -> None:
    root, rec = baseline
    _clone(root, tmp_path)
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setattr(tracking, "_unreachable", set())  # this process has not met the host yet
    _fault()
    start = time.perf_counter()
    again = _run(tmp_path, "force=true", "logger=wandb", "+logger.init_timeout=3", f"logger.dir={tmp_path / 'wb'}")
    elapsed = time.perf_counter() - start
    assert again.finished, again.traceback
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "the run is kept offline for `wandb sync`"
    assert elapsed < 120, f"bounded: took {elapsed:.0f} s"
    audit(tmp_path / "store", keep=[rec])


def test_old_finished_records_with_non_finite_metrics_stay_out_of_tables(tmp_path: Path) -> None:
    """Records written before the runner failed diverged runs: the aggregator warns and leaves them out."""
    store = ResultsStore(tmp_path / "store")
    for rid, method, fid in (("good", "fp", 5.0), ("diverged", "rtn", float("nan"))):
        store.write(RunRecord(rid, "tiny_unet", method, "w32a32" if method == "fp" else "w8a8", status="finished",
                              metrics={"fid": fid}))
    _fault()
    with pytest.warns(UserWarning, match=r"non-finite metrics and are left out of the tables: \['diverged'\]"):
        aggregate(tmp_path / "store", tmp_path / "tables", formats=["md"])
    table = (tmp_path / "tables" / "quality.md").read_text()
    assert "FP" in table and "RTN" not in table and "nan" not in table.lower()
    assert store_main(["verify", "--store", str(tmp_path / "store")]) == 1, "verify reports it as a problem"


def test_latency_cells_measured_under_load_are_flagged() -> None:
    def rec(rid: str, loaded: bool) -> RunRecord:
        return RunRecord(rid, "tiny_unet", "rtn", "w8a8", kind="latency", status="finished", backend="int8",
                         seed=int(loaded), metrics={"latency_ms": 2.0 if loaded else 1.0},
                         environment={"under_load": loaded})

    table = make_table(records_frame([rec("a", False), rec("b", True)]), "latency")
    text = to_markdown(table)
    assert f"RTN{LOAD_MARK}" in text and LOAD_NOTE in text
    calm = to_markdown(make_table(records_frame([rec("a", False)]), "latency"))
    assert LOAD_MARK not in calm.replace("**", "") and LOAD_NOTE not in calm


# --- background faults: kills and concurrent sweeps

def test_kills_during_calibration_sampling_artifact_and_store_writes_lose_nothing(background, tmp_path) -> None:
    out, err = background.kills.communicate(timeout=600)
    assert background.kills.returncode == 0, err[-3000:]
    signals = json.loads(out.strip().splitlines()[-1])
    assert signals == {"baseline": 0, "calibration": 9, "sampling": 9, "artifact_write": 9, "store_write": 9}, err
    _fault(4)
    root = background.root / "kills"
    base = ResultsStore(root / "baseline" / "store").records()[0]
    for name in ("sampling", "artifact_write", "store_write"):  # forced reruns killed: the old record stays
        audit(root / name / "store", keep=[base])
        assert (root / name / "store" / f"{base.run_id}.json").read_bytes() == \
            (root / "baseline" / "store" / f"{base.run_id}.json").read_bytes(), name
    # a kill leaves a trace: the running marker of a fresh run; a verify notes it, tables ignore it
    (marker,) = ResultsStore(root / "calibration" / "store").records()
    assert marker.status == "running"
    # temp files of the killed writes are there, and are removed once stale
    assert list((root / "artifact_write" / "artifacts").rglob(".*.tmp"))
    assert list((root / "store_write" / "store").glob(".*.tmp"))
    harness.artifacts.ArtifactCache(root / "artifact_write" / "artifacts", stale_tmp_after=0)
    ResultsStore(root / "store_write" / "store", stale_tmp_after=0)
    assert not list((root / "artifact_write" / "artifacts").rglob(".*.tmp"))
    assert not list((root / "store_write" / "store").glob(".*.tmp"))
    # recovery: the killed fresh run resumes to a finished record that remembers the kill
    done = _run(root / "calibration")
    assert done.finished and [a["status"] for a in ResultsStore(root / "calibration" / "store").get(
        done.run_id).attempts] == ["running"]
    audit(root / "calibration" / "store")


def test_two_concurrent_sweeps_on_one_store(background) -> None:
    results = [p.communicate(timeout=600) for p in background.sweeps]
    _fault()
    shared = background.root / "shared"
    for (out, err), p in zip(results, background.sweeps, strict=True):
        assert p.returncode == 1, f"a sweep with a failed run exits non-zero\n{out[-2000:]}\n{err[-2000:]}"
        assert "summary: 2 runs:" in out and "1 failed" in out and "<method.weight_init=bogus> must be one of" in out
        # tables regenerated despite the failure (or, by the sweep that ended last, found current)
        assert f"table: {shared / 'tables' / 'quality.md'}" in out or f"tables: {shared / 'tables'} (up to date" in out
    assert any(f"table: {shared / 'tables' / 'quality.md'}" in out for out, _ in results)
    records = ResultsStore(shared / "store").records()
    assert sorted(r.status for r in records) == ["failed", "finished"]
    finished = next(r for r in records if r.finished)
    assert finished.environment["under_load"], "the other sweep ran beside it: its timings are flagged"
    assert store_main(["verify", "--store", str(shared / "store"), "--artifacts", str(shared / "artifacts")]) == 0
    audit(shared / "store")


def test_zz_fault_tally(capsys: pytest.CaptureFixture) -> None:
    line = "fault suite: " + ", ".join(f"{k} {v}" for k, v in TALLY.items())
    with capsys.disabled():
        print(f"\n{line}")
    assert TALLY["records lost"] == 0 and TALLY["wrong records written"] == 0, line
