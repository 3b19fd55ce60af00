"""W&B sink with the real wandb client, offline, into a tmp dir; its .wandb log is read back and checked.

wandb 0.31 ships no Python reader for the .wandb transaction log (the Go core owns it), so
`_read_wandb_log` below parses its documented LevelDB-log framing and decodes each entry with
wandb's own protobuf `Record`.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from wandb.proto import wandb_internal_pb2

from harness import tracking
from harness.store import ResultsStore, RunRecord
from harness.tracking import NullSink, WandbSink, make_sink, resolve_mode, run_name

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _read_wandb_log(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def _finished_log(run_dir: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The run's log once wandb-core has flushed it: it closes the file shortly after finish()."""
    deadline = time.monotonic() + timeout
    while True:
        log = _read_wandb_log(next(run_dir.glob("run-*.wandb")))
        if _by_type(log, "exit") or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def _by_type(records: list[wandb_internal_pb2.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No credentials, an unreachable W&B host, all wandb state under tmp."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt would fail
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def _record(tmp: Path, **kw) -> RunRecord:
    grid = tmp / "grid.png"
    Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)).save(grid)
    base = dict(
        run_id="0123456789abcdef", model="ddpm_mnist", method="tfmq", bits="w4a8", backend="fake",
        sampler="ddim", seed=0, status="finished", metrics={"fid": 12.5, "is": 8.25, "calib_seconds": 3.0},
        curves={"timesteps": [999, 666, 333, 0], "temporal_feature_error": [0.4, 0.3, 0.2, 0.1],
                "trajectory_error": [0.0, 0.1, 0.2, 0.3], "per_block": {"down.0": [1, 2, 3, 4]}},
        config={"model": {"name": "ddpm_mnist"}, "bits": {"weight_bits": 4, "act_bits": 8}},
        artifacts={"grid": str(grid)},
    )
    return RunRecord(**{**base, **kw})


def test_offline_run_logs_config_metrics_curves_grid_and_record(offline_env: Path) -> None:
    record = _record(offline_env)
    ResultsStore(offline_env / "store").write(record)  # the store first, as the runner does
    sink = make_sink({"name": "wandb", "project": "ptq", "mode": "auto", "dir": str(offline_env / "wb")},
                     group="sweep-42")
    assert isinstance(sink, WandbSink) and sink.mode == "offline"
    start = time.perf_counter()
    sink.log_record(record)
    sink.finish()
    sink.finish()  # idempotent, safe in finally
    assert time.perf_counter() - start < 20, "offline logging must not wait on the network"

    run_dir = Path(sink.location)
    assert run_dir.parent == offline_env / "wb" / "wandb" and run_dir.name.startswith("offline-run-")
    log = _finished_log(run_dir)
    run = _by_type(log, "run")[0]
    assert (run.project, run.run_group, run.display_name) == ("ptq", "sweep-42", "ddpm_mnist/tfmq/w4a8/fake")
    assert set(run.tags) == {"ddpm_mnist", "tfmq", "w4a8", "fake"}
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"] == {"name": "ddpm_mnist"} and config["bits"]["weight_bits"] == 4

    history = {"/".join(i.nested_key) or i.key: i.value_json for h in _by_type(log, "history") for i in h.item}
    assert json.loads(history["metrics/fid"]) == 12.5 and json.loads(history["metrics/is"]) == 8.25
    assert json.loads(history["samples/grid/_type"]) == "image-file"
    assert json.loads(history["curves/temporal_feature_error_table/_type"]) == "table-file"
    summary = {"/".join(u.nested_key) or u.key: u.value_json for s in _by_type(log, "summary") for u in s.update}
    assert json.loads(summary["run_id"]) == record.run_id and json.loads(summary["status"]) == "finished"
    assert _by_type(log, "exit")[0].exit_code == 0

    files = run_dir / "files"
    table = json.loads(next(files.glob("media/table/curves/temporal_feature_error_table_*.json")).read_text())
    assert table["columns"] == ["timestep", "temporal_feature_error"] and table["data"][0] == [999, 0.4]
    per_block = json.loads(next(files.glob("media/table/curves/per_block_table_*.json")).read_text())
    assert per_block["columns"] == ["timestep", "per_block", "series"] and len(per_block["data"]) == 4
    grid = next(files.glob("media/images/samples/grid_*.png"))
    assert Image.open(grid).size == (64, 64)
    assert json.loads((files / "run_record.json").read_text()) == record.to_dict()
    saved = {f.path for fs in _by_type(log, "files") for f in fs.files}
    assert "run_record.json" in saved


def test_failed_record_is_a_failed_run_with_the_error(offline_env: Path) -> None:
    record = _record(offline_env, status="failed", error="RuntimeError: boom", metrics={}, curves={})
    sink = WandbSink(mode="offline", dir=str(offline_env / "wb"))
    sink.log_record(record, images=torch.rand(3, 20, 30))  # a grid tensor instead of the PNG path
    log = _finished_log(Path(sink.location))
    grid = next((Path(sink.location) / "files").glob("media/images/samples/grid_*.png"))
    assert Image.open(grid).size == (30, 20)
    assert _by_type(log, "exit")[0].exit_code == 1
    summary = {u.key: json.loads(u.value_json) for s in _by_type(log, "summary") for u in s.update if u.key}
    assert summary["error"] == "RuntimeError: boom" and summary["status"] == "failed"


def test_wandb_errors_are_warnings_and_the_stored_record_is_untouched(
        offline_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResultsStore(offline_env / "store")
    record = _record(offline_env)
    path = store.write(record)
    before = path.read_bytes()
    blocker = offline_env / "wb"
    blocker.write_text("a file where W&B wants its folder")  # every W&B call fails, online or offline
    sink = WandbSink(mode="offline", dir=str(blocker))
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        sink.log_record(record)
        sink.finish()
    assert "W&B logging of run 0123456789abcdef failed" in caplog.text and "safe in the store" in caplog.text
    assert path.read_bytes() == before and store.is_finished(record.run_id)


def test_online_init_failure_falls_back_to_offline_within_the_bound(
        offline_env: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode with a key but a closed port (127.0.0.1:9): init gives up after init_timeout and the
    run is logged offline (a `wandb sync`-able folder) instead of being lost; the next run of the
    process goes offline without waiting again."""
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(tracking, "_unreachable", set())  # fresh per-process memory for this test
    record = _record(offline_env)
    sink = make_sink({"name": "wandb", "mode": "online", "dir": str(offline_env / "wb"), "init_timeout": 3})
    assert isinstance(sink, WandbSink) and sink.mode == "online" and sink.init_timeout == 3.0
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        sink.log_record(record)
    elapsed = time.perf_counter() - start
    assert "logging run 0123456789abcdef offline instead" in caplog.text and "wandb sync" in caplog.text
    assert sink.mode == "offline" and Path(sink.location).name.startswith("offline-run-")
    assert _by_type(_finished_log(Path(sink.location)), "run"), "the offline run holds the record's run"
    assert elapsed < 3 + 25, f"init must give up within its bound (took {elapsed:.0f} s)"
    again = make_sink({"name": "wandb", "mode": "online", "dir": str(offline_env / "wb"), "init_timeout": 3})
    start = time.perf_counter()
    again.log_record(record)
    assert again.mode == "offline" and time.perf_counter() - start < 3, "no second wait on a dead host"


def test_init_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"<logger.init_timeout=0> must be a positive number"):
        make_sink({"name": "wandb", "mode": "offline", "init_timeout": 0})


def test_mode_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "offline", "no key, no netrc"
    netrc.write_text("machine example.org login user password k\n")
    assert resolve_mode("auto") == "offline", "a netrc entry for another host is not a W&B login"
    netrc.write_text("machine api.wandb.ai login user password 0123456789\n")
    netrc.chmod(0o600)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mycorp.example")
    assert resolve_mode("auto") == "offline", "the netrc entry must match the configured host"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline" and resolve_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline", "an explicit WANDB_MODE wins over auto-detection"
    with pytest.raises(ValueError, match="accepted: auto, offline, online, disabled"):
        resolve_mode("sometimes")


def test_make_sink_choices() -> None:
    assert isinstance(make_sink(None), NullSink) and isinstance(make_sink({"name": "none"}), NullSink)
    assert isinstance(make_sink({"name": "wandb", "mode": "disabled"}), NullSink)
    sink = make_sink({"name": "wandb", "project": "p", "entity": None, "mode": "offline", "dir": None}, group="g")
    assert isinstance(sink, WandbSink) and (sink.project, sink.group, sink.mode) == ("p", "g", "offline")
    with pytest.raises(ValueError, match="accepted: wandb, none"):
        make_sink({"name": "tensorboard"})
    with pytest.raises(ValueError, match=r"unknown keys \['projekt'\]"):
        make_sink({"name": "wandb", "projekt": "p"})


def test_logger_yamls_build_their_sinks(offline_env: Path) -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "logger"
    wandb_cfg = OmegaConf.to_container(OmegaConf.load(conf / "wandb.yaml"))
    assert isinstance(make_sink(wandb_cfg, group="g"), WandbSink)
    assert isinstance(make_sink(OmegaConf.to_container(OmegaConf.load(conf / "none.yaml"))), NullSink)


def test_run_name_is_readable() -> None:
    rec = RunRecord("a", "ddpm_mnist", "tfmq", "w4a8", backend="fake")
    assert run_name(rec) == "ddpm_mnist/tfmq/w4a8/fake"
    rec.variant = "no_fsc"
    assert run_name(rec) == "ddpm_mnist/tfmq:no_fsc/w4a8/fake"
