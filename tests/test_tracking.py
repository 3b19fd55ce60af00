"""W&B sink with the real wandb client, offline, into a tmp dir; its .wandb log is read back and checked.

wandb 0.31 ships no Python reader for the .wandb transaction log (the Go core owns it), so
`read_wandb_log` below parses its documented LevelDB-log framing and decodes each entry with
wandb's own protobuf `Record`. tests/test_wandb_live.py uses these readers for whole runs.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from wandb.proto import wandb_internal_pb2

from harness import tracking
from harness.store import ResultsStore, RunRecord
from harness.tracking import NullSink, WandbSink, curve_rows, headline, make_sink, resolve_mode, run_config, run_name
from methods.engine import events

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_log(path: Path) -> list[wandb_internal_pb2.Record]:
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


def finished_log(run_dir: Path, timeout: float = 30.0) -> list[wandb_internal_pb2.Record]:
    """The run's log once wandb-core has flushed it: it closes the file shortly after finish()."""
    deadline = time.monotonic() + timeout
    while True:
        log = read_wandb_log(next(run_dir.glob("run-*.wandb")))
        if by_type(log, "exit") or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def by_type(records: list[wandb_internal_pb2.Record], kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def _key(item: Any) -> str:
    return "/".join(item.nested_key) or item.key


def history(records: list[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    """History rows in logging order, values decoded."""
    return [{_key(i): json.loads(i.value_json) for i in h.item} for h in by_type(records, "history")]


def summary(records: list[wandb_internal_pb2.Record]) -> dict[str, Any]:
    """The final summary: the last update of each key."""
    out: dict[str, Any] = {}
    for s in by_type(records, "summary"):
        out.update({_key(u): json.loads(u.value_json) for u in s.update})
    return out


def exit_code(records: list[wandb_internal_pb2.Record]) -> int:
    return by_type(records, "exit")[0].exit_code


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


def _grid(path: Path, seed: int = 0) -> str:
    Image.fromarray(((np.arange(64 * 64 * 3) + seed) % 251).astype(np.uint8).reshape(64, 64, 3)).save(path)
    return str(path)


def _record(tmp: Path, **kw) -> RunRecord:
    base = dict(
        run_id="0123456789abcdef", model="ddpm_mnist", method="tfmq", bits="w4a8", backend="fake",
        sampler="ddim", seed=0, status="finished",
        metrics={"fid": 12.5, "fid_ci_lo": 10.0, "fid_ci_hi": 15.0, "is": 8.25, "calib_seconds": 3.0},
        curves={"timesteps": [999, 666, 333, 0], "temporal_feature_error": [0.4, 0.3, 0.2, 0.1],
                "trajectory_error": [0.0, 0.1, 0.2, 0.3], "per_block": {"down.0": [1, 2, 3, 4]}},
        config={"model": {"name": "ddpm_mnist", "dataset": "mnist"}, "bits": {"weight_bits": 4, "act_bits": 8},
                "recipe": "quick", "eval": {"extractor": "auto", "seed": 0},
                "method": {"name": "tfmq", "lr": 0.001,
                           "recipes": {"quick": {"iters": 10}, "paper": {"iters": 20000}}}},
        report={"recipe": {"lr": 0.001, "iters": 10, "variant": "select"}, "timings": {"quantize": 2.0},
                "details": {"weight_recon": {"blocks": {"down.0": {"loss_before": 0.5, "loss_after": 0.25, "iters": 10,
                                                                   "seconds": 1.0, "layers": 2}}},
                            "tiar": {"layers": ["a", "b"], "loss_before": 0.2, "loss_after": 0.1, "iters": 10,
                                     "seconds": 0.5}}},
        artifacts={"grid": _grid(tmp / "grid.png"), "fp_grid": _grid(tmp / "fp_grid.png", seed=7)},
    )
    return RunRecord(**{**base, **kw})


def test_live_run_logs_phases_and_losses_as_they_happen_then_the_results(offline_env: Path) -> None:
    record = _record(offline_env)
    sink = make_sink({"name": "wandb", "project": "ptq", "mode": "auto", "dir": str(offline_env / "wb"),
                      "console": "off"}, group="sweep-42")
    assert isinstance(sink, WandbSink) and sink.mode == "offline"
    start = time.perf_counter()
    sink.start(record)
    run_dir = Path(sink.location)
    assert run_dir.parent == offline_env / "wb" / "wandb" and run_dir.name.startswith("offline-run-")
    sink.phase("load", 0.5)
    events.emit("recon_iter", block="down.0", iter=0, loss=0.4, weights=2, acts=0)
    events.emit("recon_block", block="down.0", before=0.5, after=0.25, weights=2, acts=0)
    events.emit("recon_iter", block="down.0", iter=0, loss=0.3, weights=0, acts=1)
    ResultsStore(offline_env / "store").write(record)  # the store first, as the runner does
    sink.log_record(record)
    events.emit("recon_iter", block="late", iter=0, loss=9.0, weights=1, acts=0)  # after the end: not logged
    sink.finish()  # idempotent, safe in finally
    assert time.perf_counter() - start < 20, "offline logging must not wait on the network"

    log = finished_log(run_dir)
    run = by_type(log, "run")[0]
    assert (run.project, run.run_group, run.display_name, run.job_type) == (
        "ptq", "sweep-42", "ddpm_mnist/tfmq/w4a8/fake", "quality")
    assert set(run.tags) == {"ddpm_mnist", "tfmq", "w4a8", "fake"}
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["bits"]["weight_bits"] == 4
    assert config["method"] == {"name": "tfmq", "lr": 0.001, "iters": 10}, "the selected recipe, not every recipe"
    later = {u.key: json.loads(u.value_json) for c in by_type(log, "config") for u in c.update}
    assert later["method"]["variant"] == "select" and later["method"]["iters"] == 10, "updated with what ran"
    metrics = {(m.glob_name or m.name): m.step_metric for m in by_type(log, "metric")}
    assert metrics["curves/*"] == "timestep" and metrics["recon/*"] == "recon/step"

    rows = history(log)
    live = [r for r in rows if "timings/load" in r or any(k.startswith(("recon/", "block/")) for k in r)]
    assert [r["_step"] for r in live] == [0, 1, 2, 3], "phase, loss, block, loss: in the order they happened"
    assert live[1]["recon/loss_weights"] == 0.4 and live[3]["recon/loss_acts"] == 0.3
    assert live[2]["block/weights/loss_after"] == 0.25 and live[2]["block/index"] == 1
    assert not any(r.get("recon/loss_weights") == 9.0 for r in rows), "no logging after the run ended"
    curves = [r for r in rows if "timestep" in r]
    assert [r["timestep"] for r in curves] == [0, 333, 666, 999], "one row per timestep, the x axis"
    assert curves[0]["curves/temporal_feature_error"] == 0.1 and curves[-1]["curves/per_block/down.0"] == 1
    assert min(r["_step"] for r in curves) > live[-1]["_step"]
    final = next(r for r in rows if "samples/grid/_type" in r)
    assert final["samples/grid/_type"] == "image-file" and final["samples/grid/caption"].startswith("ddpm_mnist/tfmq")
    assert final["samples/fp_vs_quantized/_type"] == "images/separated" and final["samples/fp_vs_quantized/count"] == 2
    assert final["tables/reconstruction/_type"] == "table-file"

    summ = summary(log)
    assert summ["metrics/fid"] == 12.5 and summ["metrics/is"] == 8.25 and summ["timings/quantize"] == 2.0
    assert summ["timings/load"] == 0.5 and summ["run_id"] == record.run_id and summ["status"] == "finished"
    assert exit_code(log) == 0

    files = run_dir / "files"
    table = json.loads(next(files.glob("media/table/tables/reconstruction_*.json")).read_text())
    assert table["columns"][:5] == ["stage", "block", "phase", "loss_before", "loss_after"]
    assert table["data"] == [["weight_recon", "down.0", "weights", 0.5, 0.25, 10, 1.0],
                             ["tiar", "tiar", "weights", 0.2, 0.1, 10, 0.5]]
    assert json.loads((files / "run_record.json").read_text()) == record.to_dict()
    artifact = next(a for a in by_type(log, "artifact") if a.type == "run-record")
    assert artifact.name == f"record-{record.run_id}"
    assert {e.path for e in artifact.manifest.contents} >= {"record.json", "grid.png", "fp_grid.png",
                                                            "tables-reconstruction.table.json"}


def test_a_record_never_seen_live_gets_its_block_losses_from_the_report(offline_env: Path) -> None:
    record = _record(offline_env)
    sink = WandbSink(mode="offline", dir=str(offline_env / "wb"), console="off", stats=False)
    sink.log_record(record)  # no start(): a resumed or synced record
    rows = history(finished_log(Path(sink.location)))
    blocks = [r for r in rows if "block/index" in r]
    assert [(r["block/index"], r.get("block/weights/loss_after"), r.get("block/acts/loss_after")) for r in blocks] == [
        (1, 0.25, None), (2, 0.1, None)]


def test_failed_record_is_a_failed_run_with_the_error(offline_env: Path) -> None:
    record = _record(offline_env, status="failed", error="RuntimeError: boom", metrics={}, curves={})
    sink = WandbSink(mode="offline", dir=str(offline_env / "wb"), console="off")
    sink.log_record(record, images=torch.rand(3, 20, 30))  # a grid tensor instead of the PNG path
    log = finished_log(Path(sink.location))
    grid = next((Path(sink.location) / "files").glob("media/images/samples/grid_*.png"))
    assert Image.open(grid).size == (30, 20)
    assert exit_code(log) == 1
    summ = summary(log)
    assert summ["error"] == "RuntimeError: boom" and summ["status"] == "failed"


def test_a_run_that_never_logs_its_record_ends_failed(offline_env: Path) -> None:
    """An exception that escapes the run (the runner calls finish() on its way out): failed, not finished."""
    sink = WandbSink(mode="offline", dir=str(offline_env / "wb"), console="off")
    sink.start(_record(offline_env))
    sink.phase("load", 0.1)
    sink.finish()
    assert exit_code(finished_log(Path(sink.location))) == 1


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
        sink.start(record)
        sink.phase("load", 1.0)
        sink.log_record(record)
        sink.finish()
    assert "W&B start of run 0123456789abcdef failed" in caplog.text and "safe in the store" in caplog.text
    assert sink.errors == 1 and sink.location is None
    assert path.read_bytes() == before and store.is_finished(record.run_id)


def test_a_live_logging_failure_warns_once_and_the_run_goes_on(
        offline_env: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = WandbSink(mode="offline", dir=str(offline_env / "wb"), console="off")
    sink.start(_record(offline_env))

    def full_disk(*args: Any, **kwargs: Any) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(sink._run, "log", full_disk)
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        sink.phase("load", 1.0)
        events.emit("recon_iter", block="b", iter=0, loss=1.0, weights=1, acts=0)
        sink.phase("quantize", 2.0)
    assert caplog.text.count("W&B live logging stopped (the run goes on): OSError: no space left") == 1
    assert sink.errors == 1
    sink.finish()


def test_events_cost_nothing_without_listeners_and_a_failing_listener_is_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    events.emit("recon_iter", loss=1.0)  # nobody listens: a no-op
    seen: list[tuple[str, dict]] = []

    def broken(kind: str, **values: Any) -> None:
        raise RuntimeError("listener bug")

    stop = events.subscribe(lambda kind, **values: seen.append((kind, values)))
    events.subscribe(broken)
    with caplog.at_level(logging.WARNING, logger="methods.engine.events"):
        events.emit("recon_block", block="b", before=1.0, after=0.5)
        events.emit("recon_block", block="c", before=1.0, after=0.5)
    stop()
    stop()  # idempotent
    events.emit("recon_block", block="d", before=1.0, after=0.5)
    assert [v["block"] for _, v in seen] == ["b", "c"]
    assert caplog.text.count("listener bug") == 1, "the broken listener was removed after its first failure"


def test_curve_rows_are_ascending_timesteps_and_skip_misaligned_series(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harness.tracking"):
        rows = curve_rows({"timesteps": [20, 10], "a": [2.0, 1.0], "bad": [1.0], "nested": {"x": [5, 6]}})
    assert rows == [{"timestep": 10, "curves/a": 1.0, "curves/nested/x": 6.0},
                    {"timestep": 20, "curves/a": 2.0, "curves/nested/x": 5.0}]
    assert "'curves/bad' is not aligned" in caplog.text
    assert curve_rows({}) == []


def test_run_config_shows_the_recipe_that_runs() -> None:
    recipes = {"quick": {"iters": 5}, "paper": {"iters": 9}}
    cfg = {"recipe": "paper", "method": {"name": "q", "iters": 1, "recipes": recipes}}
    assert run_config(cfg)["method"] == {"name": "q", "iters": 9}
    assert run_config({"method": {"name": "fp"}}) == {"method": {"name": "fp"}}


def test_headline_is_one_line_with_metric_names_cis_and_where_it_went(tmp_path: Path) -> None:
    record = _record(tmp_path)
    line = headline(record, "store/0123456789abcdef.json")
    assert line == ("ddpm_mnist/tfmq/w4a8/fake finished: LeNet-FID 12.5 [10, 15] IS 8.25 calib 3 s "
                    "-> store/0123456789abcdef.json")
    assert "W&B" not in line, "no W&B part without a W&B run (logger=none)"
    assert headline(record, "x.json", "wandb/offline-run-1").endswith("-> x.json | W&B wandb/offline-run-1")
    failed = _record(tmp_path, status="failed", error="RuntimeError: boom\nmore", metrics={})
    assert headline(failed, "x.json") == "ddpm_mnist/tfmq/w4a8/fake failed: RuntimeError: boom -> x.json"
    assert headline(failed, "x.json", "wb/run").endswith("boom -> x.json | W&B wb/run")
    assert "\n" not in headline(record, "x.json")


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
    assert by_type(finished_log(Path(sink.location)), "run"), "the offline run holds the record's run"
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
