"""The benchmark scripts run end to end on a tiny model (their timings are quoted, never asserted)."""

from pathlib import Path

import pytest

from harness import overhead, sweep_time
from harness.store import ResultsStore

TINY = ["model=tiny_unet", "eval=smoke", "logger=none", "sampler.steps=4", "calibration.n_samples=4"]


def test_sweep_time_runs_the_sweep_then_resumes_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    sweep_time.main(["--store", str(store), "--artifacts", str(tmp_path / "art"),
                     "--sweep", "method=fp,rtn", "bits=w8a8", "--", *TINY, f"paths.outputs={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    records = ResultsStore(store).records()
    assert sorted(r.method for r in records) == ["fp", "rtn"] and all(r.finished for r in records)
    assert "from scratch:" in out and "all resumed:" in out
    assert out.count("finished") == 2, "both new runs are listed with their phases"


def test_overhead_splits_a_run_into_work_and_harness(capsys: pytest.CaptureFixture) -> None:
    overhead.main([*TINY, "method=rtn", "bits=w8a8"])
    out = capsys.readouterr().out
    assert "sampling" in out and "overhead" in out
