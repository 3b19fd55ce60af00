"""`python -m harness.compare`: one override's effect, paired over the shared eval samples, with the
config difference named; prefixes across stores; clear errors for unknown or ambiguous ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import compare as C
from harness.metrics import uncertainty as U
from harness.store import ResultsStore, RunRecord

SETTINGS = U.Bootstrap(resamples=200)
META = {"n": 500, "resamples": 200, "level": 0.95, "bootstrap_seed": 0, "max_rows": SETTINGS.max_rows,
        "eval_seed": 0, "sampler": "ddim/50", "extractor": "lenet"}


def _run(store: Path, run_id: str, psnr: np.ndarray, split: bool) -> None:
    """A finished record whose PSNR and its wide unpaired CI come from `psnr`, features in the store."""
    sample = U.SampleSet(psnr=psnr)
    (store / "features").mkdir(parents=True, exist_ok=True)
    sample.save(store / "features" / f"{run_id}.safetensors", META,
                U.bootstrap_statistics(sample, SETTINGS, ["psnr_vs_fp"]))
    half = 1.96 * float(psnr.std()) / np.sqrt(len(psnr))
    value = float(psnr.mean())
    config = {"method": {"name": "qdiff", "split_weights": split}, "paths": {"store": str(store)}, "seed": 0}
    ResultsStore(store).write(RunRecord(
        run_id, "ddpm_mnist", "qdiff", "w4a8", seed=0, backend="fake", sampler="ddim", status="finished",
        config=config, metrics={"psnr_vs_fp": value, "psnr_vs_fp_ci_lo": value - half,
                                "psnr_vs_fp_ci_hi": value + half, "ci_level": 0.95, "calib_seconds": 10.0}))


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Path, Path]:
    g = np.random.default_rng(0)
    shared = g.normal(25.0, 3.0, 500)  # per-sample difficulty both runs share (same eval noise)
    main, diag = tmp_path / "main", tmp_path / "diag"
    _run(main, "aaaa000000000001", shared + g.normal(0, 0.1, 500), split=False)
    _run(diag, "bbbb000000000002", shared + 0.3 + g.normal(0, 0.1, 500), split=True)  # inside both CIs
    _run(diag, "bbbb000000000003", shared + g.normal(0, 0.1, 500), split=True)
    return main, diag


def test_paired_effect_is_found_and_the_change_named(stores: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    main, diag = stores
    assert C.main(["aaaa", "bbbb000000000002", "bbbb000000000003", "--store", str(main), "--store", str(diag),
                   "--metrics", "psnr_vs_fp,calib_seconds"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("### ")[1:]
    assert first.startswith("bbbb000000000002: method.split_weights: False -> True\n"), "paths are not a change"
    psnr = next(line for line in first.splitlines() if line.startswith("| PSNR"))
    assert psnr.endswith("| better |"), psnr  # the 0.3 dB gap is inside each run's own CI: only pairing shows it
    assert "| not tested |" in first, "calib time has no uncertainty: no verdict"
    assert "| no difference shown |" in second


def test_config_changes_count_other_methods_settings() -> None:
    base = {"method": {"name": "qdiff", "act_lr": 4e-4}, "paths": {"store": "a"}}
    run = {"method": {"name": "tfmq", "act_lr": 4e-4, "tiar": True}, "paths": {"store": "b"}}
    assert C.config_changes(base, run) == ["method.name: qdiff -> tfmq", "1 settings only the run has"]


def test_unknown_or_ambiguous_ids_fail_clearly(stores: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    main, diag = stores
    assert C.main(["aaaa", "bbbb", "--store", str(main), "--store", str(diag)]) == 2
    assert "matches 2 records" in capsys.readouterr().err
    assert C.main(["ffff", "aaaa", "--store", str(main)]) == 2
    assert "matches no record" in capsys.readouterr().err
