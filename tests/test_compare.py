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


def _run(store: Path, run_id: str, psnr: np.ndarray, split: bool, seed: int = 0) -> None:
    """A finished record whose PSNR and its wide unpaired CI come from `psnr`, features in the store."""
    sample = U.SampleSet(psnr=psnr)
    (store / "features").mkdir(parents=True, exist_ok=True)
    sample.save(store / "features" / f"{run_id}.safetensors", META,
                U.bootstrap_statistics(sample, SETTINGS, ["psnr_vs_fp"]))
    half = 1.96 * float(psnr.std()) / np.sqrt(len(psnr))
    value = float(psnr.mean())
    config = {"method": {"name": "qdiff", "split_weights": split, "seed": seed}, "paths": {"store": str(store)},
              "seed": seed}
    ResultsStore(store).write(RunRecord(
        run_id, "ddpm_mnist", "qdiff", "w4a8", seed=seed, backend="fake", sampler="ddim", status="finished",
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


def test_an_effect_smaller_than_the_seed_spread_is_qualified(stores: tuple[Path, Path],
                                                             capsys: pytest.CaptureFixture) -> None:
    main, diag = stores
    g = np.random.default_rng(1)
    shared = g.normal(25.0, 3.0, 500)
    for seed, shift in ((1, 1.0), (2, -1.0)):  # the base config at two more seeds: std about 1 dB
        _run(main, f"aaaa00000000000{seed + 1}", shared + shift + g.normal(0, 0.1, 500), split=False, seed=seed)
    _run(diag, "cccc000000000001", shared + 3.0, split=True, seed=1)  # another seed of the run: not a base seed
    assert C.main(["aaaa000000000001", "bbbb000000000002", "--store", str(main), "--store", str(diag),
                   "--metrics", "psnr_vs_fp"]) == 0
    out = capsys.readouterr().out
    psnr = next(line for line in out.splitlines() if line.startswith("| PSNR"))
    assert "(3) | better; within 2 seed std |" in psnr, psnr  # +0.3 dB: real on these samples, not across seeds
    assert "over the 3 seed(s)" in out
    spread = C.seed_std(C.seed_runs(ResultsStore(main).records()[0], ResultsStore(main).records()), "psnr_vs_fp")
    assert spread is not None and spread[1] == 3 and 0.8 < spread[0] < 1.2


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
