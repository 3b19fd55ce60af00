"""Whole runs with the live W&B sink (real wandb client, offline, tmp dirs) and harness.wandb_sync.

The offline run folders wandb writes are read back (tests/test_tracking.py's .wandb reader): what was
logged live, in which order, the summary, the exit code, and which records the sync pushed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_tracking import by_type, exit_code, finished_log, history, summary

from harness import runner, wandb_sync
from harness.runner import run
from harness.store import ResultsStore, RunRecord

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
# 51 iterations: losses are emitted at iterations 0 and 50 of each block
RECIPE = {"iters": 51, "act_iters": 51, "n_steps": 1, "samples_per_step": 4, "batch_size": 4, "capture_batch_size": 8}


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline W&B, silent, every wandb folder under tmp, no credentials, an unreachable host."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def _cfg(tmp: Path, method: str, *overrides: str, wandb: bool = True):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        recipe = [f"method.recipes.quick.{k}={v}" for k, v in RECIPE.items()] if method == "qdiff" else []
        logger = ["logger=wandb", f"logger.dir={tmp / 'wb'}"] if wandb else ["logger=none"]
        return compose(config_name="config", overrides=[
            "model=tiny_unet", "eval=smoke", "sampler.steps=4", "calibration.n_samples=4", f"method={method}",
            "bits=w4a8", *logger, *recipe,
            f"paths.store={tmp / 'store'}", f"paths.artifacts={tmp / 'artifacts'}", f"paths.outputs={tmp / 'out'}",
            *overrides,
        ])


def _runs(tmp: Path) -> dict[str, Path]:
    """W&B run folders by display name."""
    return {by_type(finished_log(d), "run")[0].display_name: d for d in (tmp / "wb" / "wandb").glob("offline-run-*")}


def test_a_run_is_live_in_wandb_from_its_start_to_its_results(
        wandb_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="harness"):
        rec = run(_cfg(wandb_env, "qdiff"), group="sweep-7")
    assert rec.status == "finished", rec.traceback
    runs = _runs(wandb_env)
    assert set(runs) == {"tiny_unet/qdiff/w4a8/fake", "tiny_unet/fp/w32a32/fake"}, "the run and its FP reference"
    q = runs["tiny_unet/qdiff/w4a8/fake"]
    stored = ResultsStore(wandb_env / "store").get(rec.run_id)
    assert stored.artifacts["wandb"] == str(q), "the store knows the run reached W&B"

    log = finished_log(q)
    info = by_type(log, "run")[0]
    assert (info.run_group, info.job_type) == ("sweep-7", "quality")
    rows = history(log)
    step = {key: [r["_step"] for r in rows if key in r] for key in (
        "timings/load", "recon/loss_weights", "recon/loss_acts", "block/weights/loss_after", "timings/quantize",
        "timings/metrics", "timestep")}
    assert all(step.values()), {k: len(v) for k, v in step.items()}
    assert max(step["timings/load"]) < min(step["recon/loss_weights"]), "load finished before reconstruction"
    assert max(step["recon/loss_weights"]) < min(step["recon/loss_acts"]), "weight pass, then activation pass"
    assert max(step["recon/loss_acts"]) < min(step["timings/quantize"]), "losses logged while quantizing"
    assert max(step["timings/metrics"]) < min(step["timestep"]), "curves once the record is stored"
    n_blocks = len(stored.report["details"]["weight_recon"]["blocks"])
    assert len(step["block/weights/loss_after"]) == n_blocks and len(step["recon/loss_weights"]) >= 2 * n_blocks
    curves = [r for r in rows if "timestep" in r]
    assert sorted(r["timestep"] for r in curves) == sorted(rec.curves["timesteps"])
    assert all("curves/temporal_feature_error" in r and "curves/trajectory_error" in r for r in curves)

    summ = summary(log)
    assert summ["metrics/psnr_vs_fp"] == pytest.approx(rec.metrics["psnr_vs_fp"])
    assert summ["metrics/calib_seconds"] == pytest.approx(rec.metrics["calib_seconds"])
    assert summ["status"] == "finished" and exit_code(log) == 0
    final = next(r for r in rows if "samples/fp_vs_quantized/_type" in r)
    assert final["samples/fp_vs_quantized/count"] == 2 and final["samples/grid/_type"] == "image-file"
    record_artifact = next(a for a in by_type(log, "artifact") if a.type == "run-record")
    assert {e.path for e in record_artifact.manifest.contents} >= {"record.json", "grid.png", "fp_grid.png"}
    assert json.loads((q / "files" / "run_record.json").read_text())["run_id"] == rec.run_id

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tiny_unet/qdiff/w4a8/fake ")]
    assert len(lines) == 1 and "finished: PSNR vs FP (dB) " in lines[0] and f"| W&B {q}" in lines[0]
    assert "calib " in lines[0] and str(ResultsStore(wandb_env / "store").path(rec.run_id)) in lines[0]

    pushed, failed = wandb_sync.sync_store(wandb_env / "store", wandb_dir=str(wandb_env / "wb"))
    assert (pushed, failed) == ([], 0), "runs that were live in W&B are not pushed again"


def test_a_failing_run_ends_failed_and_without_wandb_prints_no_wandb(
        wandb_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = wandb_env / "not_a_folder"
    blocked.write_text("")  # the artifact cache cannot be created: the run fails while loading
    with caplog.at_level(logging.INFO, logger="harness"):
        rec = run(_cfg(wandb_env, "rtn", f"paths.artifacts={blocked}"))
        plain = run(_cfg(wandb_env, "rtn", f"paths.artifacts={blocked}", "seed=1", wandb=False))
    assert rec.status == plain.status == "failed"
    (only,) = _runs(wandb_env).values()
    log = finished_log(only)
    assert exit_code(log) == 1
    summ = summary(log)
    assert summ["status"] == "failed" and summ["error"] == rec.error and "timings/load" in summ
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tiny_unet/rtn/w4a8/fake failed:")]
    assert len(lines) == 2 and "| W&B" in lines[0] and "W&B" not in lines[1], lines


def test_an_exception_escaping_the_run_ends_the_wandb_run_failed(
        wandb_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(rc, record, out_dir, on_phase=None) -> None:
        on_phase("load", 0.25)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(wandb_env, "rtn"))
    (only,) = _runs(wandb_env).values()
    log = finished_log(only)
    assert exit_code(log) == 1 and summary(log)["timings/load"] == 0.25


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.json"))}


def test_wandb_sync_pushes_each_finished_record_of_the_reference_store_once(
        wandb_env: Path, capsys: pytest.CaptureFixture) -> None:
    store = wandb_env / "store"
    store.mkdir()
    for path in (ROOT / "results" / "store").glob("*.json"):  # a copy: the committed store is never written
        shutil.copy2(path, store / path.name)
    extra = ResultsStore(store)
    extra.write(RunRecord("feedfacefeedface", "m", "rtn", "w8a8", status="finished", artifacts={"wandb": "w"}))
    extra.write(RunRecord("deadbeefdeadbeef", "m", "rtn", "w8a8", status="failed", error="boom"))
    before = _digest(store)
    expected = {r.run_id for r in ResultsStore(store).records() if r.finished and "wandb" not in r.artifacts}
    assert len(expected) >= 5

    argv = ["--store", str(store), "--dir", str(wandb_env / "wb"), "--project", "ref"]
    assert wandb_sync.main(argv) == 0
    out = capsys.readouterr().out
    assert f"{len(expected)} record(s) pushed to W&B (offline), 0 failed" in out
    runs = list((wandb_env / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == len(expected)
    index = [json.loads(line) for line in wandb_sync.index_path(str(wandb_env / "wb")).read_text().splitlines()]
    assert {e["run_id"] for e in index} == expected

    tfmq = next(r for r in ResultsStore(store).records() if r.method == "tfmq" and r.kind == "quality")
    log = finished_log(next(d for d in runs if tfmq.run_id in d.name))
    assert exit_code(log) == 0 and by_type(log, "run")[0].project == "ref"
    summ = summary(log)
    assert summ["metrics/fid"] == pytest.approx(tfmq.metrics["fid"]) and summ["run_id"] == tfmq.run_id
    rows = history(log)
    assert len([r for r in rows if "timestep" in r]) == len(tfmq.curves["timesteps"])
    assert len([r for r in rows if "block/index" in r]) >= len(tfmq.report["details"]["weight_recon"]["blocks"])

    assert wandb_sync.main(argv) == 0
    assert "0 record(s) pushed" in capsys.readouterr().out, "a second call pushes nothing"
    assert len(list((wandb_env / "wb" / "wandb").glob("offline-run-*"))) == len(expected)
    assert _digest(store) == before, "the store is only read"
