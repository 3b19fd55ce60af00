"""The benchmark scripts run end to end on a tiny model (their timings are quoted, never asserted)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import overhead, profile_calibration, sweep_time
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


def test_budget_split_says_what_each_calibration_could_take() -> None:
    runs = [SimpleNamespace(report={"timings": {"quantize": q, "sampling": 50.0}}) for q in (100.0, 200.0, 0.0)]
    line = sweep_time.budget_split(runs, wall=500.0, budget=400.0)
    assert "calibration 300.0 s in 2 run(s); everything else 200.0 s (40 % of the sweep)" in line
    assert "each calibration would need <= 100.0 s" in line  # (400 - 200) / 2
    over = sweep_time.budget_split(runs, wall=500.0, budget=150.0)
    assert "the rest alone is over 150 s" in over


def test_sweep_time_calibration_compares_trees_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--calib: one subprocess per (round, method, tree), medians and the ratio to the first tree."""
    root = Path(sweep_time.__file__).resolve().parents[1]
    sweep_time.main(["--calib", "rtn", "--trees", str(root), str(root), "--rounds", "1", "--artifacts",
                     str(tmp_path / "art"), "--", *TINY])
    out = capsys.readouterr().out
    assert out.count("round 1 rtn") == 2 and "median of 1 interleaved rounds" in out and "1.00x" in out


def test_sweep_time_sampling_reports_throughput_against_the_peak(capsys: pytest.CaptureFixture) -> None:
    sweep_time.main(["--sampling", "--", *TINY, "eval.n_samples=2", "eval.batch_size=2"])
    out = capsys.readouterr().out
    assert "images/s" in out and "fp32 matmul peak" in out and "% of peak" in out


def test_profile_calibration_splits_phases_and_lists_ops(tmp_path: Path) -> None:
    text = profile_calibration.main([*TINY, "method=qdiff", "bits=w4a8", "profile.iters=2", "profile.op_iters=1",
                                     "profile.top=5", f"profile.out={tmp_path}", f"paths.artifacts={tmp_path / 'art'}",
                                     "method.recipes.quick.samples_per_step=2", "method.recipes.quick.n_steps=2"])
    assert (tmp_path / "qdiff.txt").read_text().strip() == text.strip()
    for phase in ("capture", "forward", "backward", "optimizer", "range_init", "other"):
        assert f"\n{phase} " in text
    assert "Self CPU" in text


def test_overhead_splits_a_run_into_work_and_harness(capsys: pytest.CaptureFixture) -> None:
    overhead.main([*TINY, "method=rtn", "bits=w8a8"])
    out = capsys.readouterr().out
    assert "sampling" in out and "overhead" in out


def test_bench_runs_every_backend_and_bits_cell_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m harness.bench` composes conf/bench.yaml like run.py (the method group's `${seed}`
    resolves) and times every backend x bits cell; one latency record per cell."""
    from harness.bench import compose, run_bench

    bench = compose(["model=tiny_unet", "bench.bits=[fp,w8a8,w4a8]", "bench.batch_sizes=[1,2]",
                     "bench.rounds=1", "bench.warmup=1", "bench.min_run_time=0.01", "bench.calib_rows=4",
                     "bench.steps=3", f"bench.store={tmp_path / 'store'}"])
    assert bench.method["seed"] == 0 and bench.method["name"] == "rtn"
    rows = run_bench(bench)
    backends = {"fake", "int8-onednn", "int8-int_mm", "openvino"}
    cells = {(r["bits"], r["method"], r["backend"]) for r in rows}
    for bits, method in (("fp", "fp"), ("w8a8", "rtn"), ("w4a8", "rtn")):
        assert {(bits, method, b) for b in backends} <= cells
    for r in rows:
        assert r["metrics"]["latency_ms"] > 0 and r["metrics"]["latency_iqr_ms_b1"] >= 0
    records = ResultsStore(tmp_path / "store").records()
    assert len(records) == len(rows) and all(r.kind == "latency" for r in records)
    assert "| bits | method | backend |" in capsys.readouterr().out


def test_bench_rejects_bad_settings_naming_the_key() -> None:
    from hydra.errors import ConfigCompositionException

    from harness.bench import compose

    with pytest.raises(ValueError, match=r"bench\.bits=w9"):
        compose(["model=tiny_unet", "bench.bits=[w9]"])
    with pytest.raises(ConfigCompositionException):
        compose(["model=tiny_unet", "bench.itres=3"])
