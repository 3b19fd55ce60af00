"""One run end to end on a tiny random model: record, resume, failure isolation, FP reference."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.callbacks import AggregateTables, ledger_path, read_ledger, summary
from harness.models.zoo import load_model
from harness.runner import run
from harness.store import ResultsStore

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def _cfg(tmp: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny_unet", "eval=smoke", "logger=none", "sampler.steps=4", "calibration.n_samples=4",
            f"paths.store={tmp / 'store'}", f"paths.artifacts={tmp / 'artifacts'}", f"paths.outputs={tmp / 'out'}",
            *overrides,
        ])


def test_run_records_metrics_curves_and_fp_reference(tmp_path: Path) -> None:
    rec = run(_cfg(tmp_path, "method=rtn", "bits=w8a8"))
    assert rec.status == "finished", rec.traceback
    assert rec.bits == "w8a8" and rec.method == "rtn"
    assert set(rec.curves["timesteps"]) and len(rec.curves["trajectory_error"]) == 4
    assert len(rec.curves["temporal_feature_error"]) == 4
    assert rec.metrics["calib_seconds"] > 0
    assert Path(rec.artifacts["grid"]).exists()
    records = ResultsStore(tmp_path / "store").records()
    fp = next(r for r in records if r.method == "fp")  # the model's own footprint, not the process RSS
    assert 0 < rec.metrics["model_weight_bytes"] < fp.metrics["model_weight_bytes"]
    assert rec.metrics["activation_peak_bytes"] > 0
    assert rec.metrics["footprint_batch_size"] == rec.config["eval"]["batch_size"]
    methods = sorted((r.method, r.bits) for r in records)
    assert methods == [("fp", "w32a32"), ("rtn", "w8a8")], "the FP reference row is recorded too"
    fp = next(r for r in records if r.method == "fp")
    assert max(fp.curves["trajectory_error"]) == pytest.approx(0.0, abs=1e-10)


def test_rerun_resumes_and_force_reruns(tmp_path: Path) -> None:
    first = run(_cfg(tmp_path, "method=fp"))
    again = run(_cfg(tmp_path, "method=fp", "logger=none"))
    assert again.created == first.created, "finished run was resumed, not rerun"
    forced = run(_cfg(tmp_path, "method=fp", "force=true"))
    assert forced.run_id == first.run_id


def test_new_weights_in_the_same_folder_are_a_new_run(tmp_path: Path) -> None:
    """Retrained weights at the same model.path must not resume the old weights' record."""
    folder = tmp_path / "weights"
    tiny = OmegaConf.to_container(OmegaConf.load(Path(CONF) / "model" / "tiny_unet.yaml"))
    load_model({**tiny, "seed": 1}).net.save_pretrained(folder, safe_serialization=True)
    first = run(_cfg(tmp_path, "method=fp", "model.init=pretrained", f"+model.path={folder}"))
    assert run(_cfg(tmp_path, "method=fp", "model.init=pretrained", f"+model.path={folder}")).run_id == first.run_id
    load_model({**tiny, "seed": 2}).net.save_pretrained(folder, safe_serialization=True)
    second = run(_cfg(tmp_path, "method=fp", "model.init=pretrained", f"+model.path={folder}"))
    assert second.status == "finished", second.traceback
    assert second.run_id != first.run_id
    assert len(ResultsStore(tmp_path / "store").records()) == 2, "the old record stays, the new one joins it"


def test_fp_identity_ignores_bits(tmp_path: Path) -> None:
    a = run(_cfg(tmp_path, "method=fp", "bits=w4a8"))
    b = run(_cfg(tmp_path, "method=fp", "bits=w8a8"))
    assert a.run_id == b.run_id


def _ledger(path: Path) -> list[tuple[str, str]]:
    return [(e["outcome"], e["run_id"]) for e in map(json.loads, path.read_text().splitlines())]


def test_failed_run_is_recorded_and_does_not_launch_its_fp_reference(tmp_path: Path) -> None:
    ledger = tmp_path / "runs.jsonl"
    rec = run(_cfg(tmp_path, "method=rtn", "model=ddpm_cifar10", "model.path=/nonexistent/folder"), ledger=ledger)
    assert rec.status == "failed"
    assert "/nonexistent/folder" in rec.error and rec.traceback
    stored = ResultsStore(tmp_path / "store").records()
    assert [(r.run_id, r.status) for r in stored] == [(rec.run_id, "failed")], "no FP reference after a failure"
    assert _ledger(ledger) == [("failed", rec.run_id)]


def test_invalid_config_returns_a_failed_record(tmp_path: Path) -> None:
    """A sweep must go on (and reach its summary and tables) past an invalid job: run() never raises."""
    rec = run(_cfg(tmp_path, "method=rtn", "sampler.steps=0"), ledger=tmp_path / "runs.jsonl")
    assert rec.status == "failed" and rec.error.startswith("invalid config: ValueError: <sampler.steps=0>")
    (stored,) = ResultsStore(tmp_path / "store").records()
    assert stored.status == "failed" and stored.run_id == rec.run_id
    assert _ledger(tmp_path / "runs.jsonl") == [("failed", rec.run_id)]


def test_run_id_error_on_an_empty_model_folder_is_a_failed_record(tmp_path: Path) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    rec = run(_cfg(tmp_path, "method=rtn", "model=ddpm_cifar10", f"model.path={empty}"))
    assert rec.status == "failed" and rec.error.startswith("run id: FileNotFoundError: no config.json")
    assert ResultsStore(tmp_path / "store").get(rec.run_id).status == "failed"


def test_failing_forced_rerun_keeps_the_finished_record(tmp_path: Path) -> None:
    """force=true with the artifact cache made unwritable (a file where the folder should be): the
    rerun fails, the finished record and its metrics stay, the failure joins its attempts."""
    first = run(_cfg(tmp_path, "method=fp"))
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    failed = run(_cfg(tmp_path, "method=fp", "force=true", f"paths.artifacts={blocked}"))
    assert failed.status == "failed" and failed.run_id == first.run_id
    kept = ResultsStore(tmp_path / "store").get(first.run_id)
    assert kept.finished and kept.metrics == first.metrics and kept.created == first.created
    assert [a["status"] for a in kept.attempts] == ["failed"] and kept.attempts[0]["error"] == failed.error
    assert {"start", "end"} <= set(first.environment["load"]) and "under_load" in first.environment
    assert first.environment["load"]["start"]["cpu_count"] >= 1


def _hydra_node(tmp: Path, mode: RunMode) -> DictConfig:
    return OmegaConf.create({"hydra": {"mode": mode, "run": {"dir": str(tmp / "run")},
                                       "sweep": {"dir": str(tmp / "sweep")}}, "paths": {"store": str(tmp / "store")}})


def test_single_run_exits_non_zero_when_a_run_of_it_failed(tmp_path: Path, capsys) -> None:
    cfg = _hydra_node(tmp_path, RunMode.RUN)
    callback = AggregateTables()
    callback.on_run_start(cfg)
    ledger = ledger_path(cfg.hydra)
    assert ledger == tmp_path / "run" / "runs.jsonl"
    run(_cfg(tmp_path, "method=rtn", "sampler.steps=0"), ledger=ledger)
    with pytest.raises(SystemExit) as exit_:
        callback.on_run_end(cfg)
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "summary: 1 runs: 0 finished, 1 failed, 0 resumed" in out and "<sampler.steps=0>" in out
    callback.on_run_start(cfg)  # a new invocation starts a new ledger
    callback.on_run_end(cfg)  # nothing failed: returns, exit code 0
    assert "summary: 0 runs" in capsys.readouterr().out


def test_sweep_summary_counts_resumed_and_failed_runs(tmp_path: Path) -> None:
    ledger = tmp_path / "runs.jsonl"
    run(_cfg(tmp_path, "method=fp"), ledger=ledger)
    run(_cfg(tmp_path, "method=fp"), ledger=ledger)
    run(_cfg(tmp_path, "method=rtn", "+method.calib_rows=abc"), ledger=ledger)
    text, failed = summary(read_ledger(ledger), ledger)
    assert failed and text.startswith("summary: 3 runs: 1 finished, 1 failed, 1 resumed")
    assert "FAILED" in text and "<method.calib_rows=abc> must be an integer >= 1" in text


def test_a_resumed_sweep_never_imports_the_engine(tmp_path: Path) -> None:
    """run.py looks the finished record up (harness.identity) before importing the runner: resuming a
    whole sweep, tables and console summary included, loads neither torch nor diffusers."""
    import subprocess
    import sys

    overrides = ["model=tiny_unet", "eval=smoke", "logger=none", "sampler.steps=4", "calibration.n_samples=4",
                 f"paths.store={tmp_path / 'store'}", f"paths.artifacts={tmp_path / 'artifacts'}",
                 f"paths.outputs={tmp_path / 'out'}"]
    for method in ("fp", "rtn"):
        assert run(_cfg(tmp_path, f"method={method}", "bits=w8a8")).status == "finished"
    root = Path(CONF).parent
    cmd = [sys.executable, "-X", "importtime", str(root / "run.py"), "-m", "method=fp,rtn", "bits=w8a8", *overrides,
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    for tables in ("table: ", "up to date"):  # the first writes the tables, the second finds them current
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "2 resumed" in done.stdout and tables in done.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time")}
        assert "harness.store" in imported, "importtime output was read"
        assert not {"torch", "diffusers", "harness.runner"} & imported
