"""Results store: record schema, atomic writes under concurrent writers, DataFrame, run id, environment."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from harness.artifacts import ArtifactCache
from harness.environment import collect_environment, git_state, machine_load, under_load
from harness.run_id import PRESENTATION_KEYS, run_id
from harness.store import SCHEMA_VERSION, CorruptRecordError, ResultsStore, RunRecord, record_checksum
from harness.store import main as store_main

REPO = Path(__file__).resolve().parents[1]


def _record(rid: str = "abc", **kw) -> RunRecord:
    base = dict(run_id=rid, model="ddpm_mnist", method="tfmq", bits="w4a8", status="finished", seed=0,
                backend="fake", sampler="ddim", metrics={"fid": 12.5, "is": 8}, curves={"timesteps": [999, 0]},
                config={"bits": {"weight_bits": 4}}, environment={"torch": "x"}, artifacts={"grid": "g.png"})
    return RunRecord(**{**base, **kw})


def test_record_round_trips_through_json() -> None:
    rec = _record(error=None, variant="no_fsc", report={"keep_fp": ["conv_in"]})
    data = json.loads(json.dumps(rec.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert RunRecord.from_dict(data) == rec
    assert rec.metrics["is"] == 8.0 and isinstance(rec.metrics["is"], float)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", rec.created), "ISO UTC"


def test_int_keyed_reports_keep_their_checksum_through_the_store(tmp_path: Path) -> None:
    """A report dict keyed by ints (e.g. PTQ4DM's rows per timestep) sorts 2 < 10 in Python but
    "10" < "2" once written: the seal must be computed on what a reader parses."""
    rec = _record(report={"rows_per_timestep": {t: t for t in (2, 10, 999, 20)}})
    store = ResultsStore(tmp_path)
    store.write(rec)
    back = store.get(rec.run_id)
    assert back is not None and back.report["rows_per_timestep"] == {str(t): t for t in (2, 10, 999, 20)}


@pytest.mark.parametrize("version", [2, None, "1"])
def test_unknown_schema_version_is_refused(version) -> None:
    data = _record().to_dict()
    del data["checksum"]  # an unsealed record: the schema check, not the checksum, must refuse it
    data["schema_version"] = version
    with pytest.raises(ValueError, match=rf"schema_version={version!r}.*accepted: {SCHEMA_VERSION}"):
        RunRecord.from_dict(data)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"kind": "speed"}, "accepted: quality, latency"),
    ({"status": "done"}, "accepted: finished, failed, running"),
    ({"run_id": "../etc"}, "run_id"),
    ({"metrics": {"fid": "low"}}, r"metrics.fid='low'.*number"),
    ({"metrics": {"seed": 1.0}}, "collide"),
    ({"curves": [1, 2]}, "<curves> must be a dict"),
])
def test_invalid_records_say_what_is_accepted(kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        _record(**kw)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        RunRecord.from_dict({**_record().to_dict(), "colour": "red", "checksum": None})


def test_store_write_get_and_resume_flag(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    assert store.get("abc") is None and not store.is_finished("abc") and store.records() == []
    store.write(_record(status="running"))
    assert not store.is_finished("abc")
    path = store.write(_record())
    assert path == store.path("abc") == tmp_path / "store" / "abc.json"
    assert store.is_finished("abc") and store.get("abc") == _record(created=store.get("abc").created)
    assert [p.name for p in path.parent.iterdir()] == ["abc.json"], "no temp files left behind"


def test_corrupted_files_warn_and_are_skipped(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(_record("good"))
    (tmp_path / "half.json").write_text('{"schema_version": 1, "run_id": "ha')
    (tmp_path / "future.json").write_text(json.dumps({**_record("future").to_dict(), "schema_version": 99,
                                                      "checksum": None}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "types.json").write_text(json.dumps({**_record("types").to_dict(), "metrics": [1],
                                                     "checksum": None}))
    (tmp_path / ".tmp123.json.tmp").write_text("{")  # a writer's temp file is not a record
    with pytest.warns(UserWarning) as caught:
        records = store.records()
    assert [r.run_id for r in records] == ["good"]
    messages = " ".join(str(w.message) for w in caught)
    assert "half.json" in messages and "future.json" in messages and len(caught) == 4
    with pytest.warns(UserWarning, match="half.json"):
        assert store.get("half") is None


def test_records_are_ordered_by_creation(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(_record("b", created="2026-01-02T00:00:00+00:00"))
    store.write(_record("a", created="2026-01-03T00:00:00+00:00"))
    store.write(_record("c", created="2026-01-01T00:00:00+00:00"))
    assert [r.run_id for r in store.records()] == ["c", "b", "a"]


def test_dataframe_has_one_row_per_record_and_metric_columns(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(_record("a", created="2026-01-01T00:00:00+00:00"))
    store.write(_record("b", method="fp", seed=None, metrics={"fid": float("nan"), "kid": 0.01},
                        created="2026-01-02T00:00:00+00:00"))
    df = store.to_dataframe()
    assert list(df["run_id"]) == ["a", "b"]
    assert {"fid", "is", "kid", "model", "bits", "variant"} <= set(df.columns)
    assert df["fid"].dtype == "float64" and df["seed"].dtype == "Int64"
    assert df.loc[0, "fid"] == 12.5 and math.isnan(df.loc[1, "fid"]) and pd.isna(df.loc[0, "kid"])
    assert pd.isna(df.loc[1, "seed"]) and df.loc[0, "seed"] == 0
    empty = ResultsStore(tmp_path / "none").to_dataframe()
    assert len(empty) == 0 and "run_id" in empty.columns


_WRITER = textwrap.dedent("""
    import sys
    from harness.store import ResultsStore, RunRecord
    store, tag, n = ResultsStore(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    pad = "x" * 200_000  # big records make a torn write likely if writes were not atomic
    for i in range(n):
        for rid in ("shared", f"own_{tag}"):
            store.write(RunRecord(rid, "m", "tfmq", "w4a8", status="finished",
                                  metrics={"i": float(i)}, report={"writer": tag, "pad": pad}))
""")


def test_concurrent_writers_of_same_and_different_ids(tmp_path: Path) -> None:
    n = 40
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag, str(n)], cwd=REPO)
             for tag in ("p1", "p2")]
    store, reads = ResultsStore(tmp_path), 0
    try:
        while any(p.poll() is None for p in procs):
            path = tmp_path / "shared.json"
            if path.exists():
                rec = RunRecord.from_dict(json.loads(path.read_text()))  # never a partial file
                assert rec.report["writer"] in ("p1", "p2")
                reads += 1
            time.sleep(0.005)
    finally:
        for p in procs:
            p.wait(timeout=120)
    assert [p.returncode for p in procs] == [0, 0]
    assert reads > 0
    assert sorted(r.run_id for r in store.records()) == ["own_p1", "own_p2", "shared"]
    assert all(r.metrics["i"] == n - 1 for r in store.records() if r.run_id != "shared")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["own_p1.json", "own_p2.json", "shared.json"]


CFG = {"model": {"name": "ddpm_mnist"}, "method": {"name": "tfmq", "tiar": True}, "bits": {"weight_bits": 4,
       "act_bits": 8}, "seed": 0, "logger": {"name": "wandb", "mode": "auto"}, "paths": {"store": "a"}}


def test_run_id_is_stable_and_ignores_presentation_keys() -> None:
    rid = run_id(CFG)
    assert re.fullmatch(r"[0-9a-f]{16}", rid)
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v) for k, v in reversed(CFG.items())}
    assert run_id(reordered) == rid, "key order must not matter"
    assert run_id({**CFG, "logger": {"name": "none"}, "paths": {"store": "b"}, "force": True,
                   "hydra": {"job": {"name": "x"}}, "print_config": True}) == rid
    assert run_id(OmegaConf.create(CFG)) == rid, "a DictConfig hashes like the equivalent dict"
    assert run_id({**CFG, "bits": {"weight_bits": 8, "act_bits": 8}}) != rid
    assert run_id({**CFG, "method": {"name": "tfmq", "tiar": False}}) != rid
    assert run_id({**CFG, "seed": 1}) != rid
    assert {"logger", "paths", "hydra", "force", "print_config"} <= set(PRESENTATION_KEYS)


def test_run_id_dotted_presentation_keys_and_unserialisable_values() -> None:
    a = {**CFG, "eval": {"n": 10, "progress": True}}
    b = {**CFG, "eval": {"n": 10, "progress": False}}
    keys = (*PRESENTATION_KEYS, "eval.progress")
    assert run_id(a) != run_id(b) and run_id(a, keys) == run_id(b, keys)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        run_id({**CFG, "x": {1, 2}})


def test_environment_is_json_and_names_versions_git_device() -> None:
    env = json.loads(json.dumps(collect_environment()))
    versions = env["versions"]
    assert torch.__version__.startswith(versions["torch"])
    assert {"python", "diffusers", "torch-fidelity", "wandb", "openvino"} <= set(versions)
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] and env["hostname"]
    assert all(f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f for f in env["cpu"]["flags"])
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", env["git"]["commit"]) and isinstance(env["git"]["dirty"], bool)


def test_git_state_outside_a_repo_is_null(tmp_path: Path) -> None:
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_records_are_sealed_and_an_edit_is_reported_not_read(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    path = store.write(_record("sealed"))
    data = json.loads(path.read_text())
    assert data["checksum"] == record_checksum(data) and RunRecord.from_dict(data) == store.get("sealed")
    path.write_text(path.read_text().replace('"fid": 12.5', '"fid": 1.5'))  # a hand edit of a number
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert store.records() == []
    with pytest.raises(CorruptRecordError):
        RunRecord.from_dict(json.loads(path.read_text()))


def test_a_failed_rerun_never_replaces_a_finished_record(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(_record("r", created="2026-01-01T00:00:00+00:00"))
    store.write(_record("r", status="running", metrics={}))  # the marker of a forced rerun: dropped
    assert store.get("r").finished and store.get("r").attempts == []
    with pytest.warns(UserWarning, match="finished record is kept"):
        store.write(_record("r", status="failed", error="OSError: [Errno 28] No space left", metrics={},
                            created="2026-01-02T00:00:00+00:00"))
    kept = store.get("r")
    assert kept.finished and kept.metrics == {"fid": 12.5, "is": 8.0}, "the finished metrics survive"
    assert [(a["status"], a["error"]) for a in kept.attempts] == [("failed", "OSError: [Errno 28] No space left")]
    store.write(_record("r", metrics={"fid": 11.0}, created="2026-01-03T00:00:00+00:00"))  # a good rerun
    assert store.get("r").metrics == {"fid": 11.0} and len(store.get("r").attempts) == 1, "history carried"


def test_a_finished_run_keeps_the_failures_and_kills_it_replaces_but_not_its_own_marker(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.write(_record("r", status="failed", error="boom", metrics={}, created="2026-01-01T00:00:00+00:00"))
    store.write(_record("r", status="running", metrics={}, created="2026-01-02T00:00:00+00:00"))  # then killed
    marker = _record("r", status="running", metrics={}, created="2026-01-03T00:00:00+00:00")
    store.write(marker)
    store.write(_record("r", created=marker.created))
    attempts = store.get("r").attempts
    assert [(a["status"], a["created"][:10]) for a in attempts] == [("failed", "2026-01-01"), ("running", "2026-01-02")]


def test_an_unreadable_record_is_set_aside_not_overwritten(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path)
    store.path("r").write_text('{"schema_version": 1, "run_id": "r", "metr')
    with pytest.warns(UserWarning, match="kept as r.json.corrupt-"):
        store.write(_record("r"))
    assert store.get("r").finished
    (aside,) = tmp_path.glob("r.json.corrupt-*")
    assert aside.read_text().startswith('{"schema_version": 1')


def test_records_are_group_readable(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        path = ResultsStore(tmp_path).write(_record())
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664, "mkstemp's 0600 must not reach the store"


def test_stale_temp_files_are_removed_when_the_store_is_opened(tmp_path: Path, monkeypatch) -> None:
    stale, young = tmp_path / ".a.123.tmp", tmp_path / ".b.456.tmp"
    for p in (stale, young):
        p.write_text("{")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    ResultsStore(tmp_path)
    assert not stale.exists() and young.exists(), "young temp files may belong to a live writer"
    monkeypatch.setenv("HARNESS_STALE_TMP_SECONDS", "0")
    ResultsStore(tmp_path)
    assert not young.exists()
    monkeypatch.setenv("HARNESS_STALE_TMP_SECONDS", "soon")
    with pytest.raises(ValueError, match="HARNESS_STALE_TMP_SECONDS=soon"):
        ResultsStore(tmp_path)


def test_verify_reports_corrupt_records_and_artifacts(tmp_path: Path, capsys) -> None:
    store_dir, art_dir = tmp_path / "store", tmp_path / "art"
    store = ResultsStore(store_dir)
    store.write(_record("good"))
    old = os.umask(0o002)
    try:
        data_file = ArtifactCache(art_dir).store("calib", {"n": 1}, {"x": torch.arange(4.0)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(data_file.stat().st_mode) == 0o664, "artifacts are shared with the group too"
    assert stat.S_IMODE(data_file.with_suffix(".json").stat().st_mode) == 0o664
    assert store_main(["verify", "--store", str(store_dir), "--artifacts", str(art_dir)]) == 0
    assert "1 records (1 finished, 0 failed, 0 running), 1 artifacts: 0 problem(s)" in capsys.readouterr().out

    (store_dir / "legacy.json").write_text(json.dumps({**_record("legacy").to_dict(), "checksum": None}))
    store.write(_record("edited"))
    store.path("edited").write_text(store.path("edited").read_text().replace('"is": 8.0', '"is": 9.0'))
    (art_file,) = art_dir.rglob("*.safetensors")
    art_file.write_bytes(art_file.read_bytes()[:-3])
    assert store_main(["verify", "--store", str(store_dir), "--artifacts", str(art_dir)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "edited.json: unreadable or corrupted: checksum mismatch" in out
    assert "sha256 does not match" in out and "note:" in out and "legacy.json: no checksum" in out
    assert out.strip().endswith("2 problem(s), 1 note(s)")


def test_machine_load_counts_other_harness_processes() -> None:
    """A second process whose command line runs the harness (`... run.py`) makes timings contended."""
    alone = machine_load()
    assert alone["cpu_count"] == os.cpu_count() and len(alone["loadavg"]) == 3
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "run.py"])
    try:
        deadline = time.time() + 10
        while machine_load()["other_harness_processes"] <= alone["other_harness_processes"]:
            assert time.time() < deadline, "the other harness process was not seen"
            time.sleep(0.05)
        busy = machine_load()
    finally:
        other.kill()
        other.wait()
    assert under_load({"start": busy})
    assert not under_load({"start": {**busy, "other_harness_processes": 0, "loadavg": [0.0, 0.0, 0.0]}})
    assert under_load({"end": {**busy, "other_harness_processes": 0, "loadavg": [9.0 * busy["cpu_count"], 0, 0]}})
