"""Significance marks: bold only when the best is significantly better, ties marked, paired tests from
the runs' saved bootstrap statistics, seeds by Welch, FID / unbiased-metric ordering flags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.aggregate.frame import records_frame
from harness.aggregate.render import to_latex, to_markdown
from harness.aggregate.significance import Evidence, compare, mark_group, ordering_flags
from harness.aggregate.table import make_table
from harness.metrics import uncertainty as U
from harness.store import RunRecord


def _part(run_ids: list[str], values: list[float], half: float | None = None, key: str = "fid") -> pd.DataFrame:
    rows = {"run_id": run_ids, key: values}
    if half is not None:
        rows |= {f"{key}_ci_lo": [v - half for v in values], f"{key}_ci_hi": [v + half for v in values],
                 "ci_level": [0.95] * len(values)}
    return pd.DataFrame(rows)


def test_constructed_tie_is_marked_not_bold() -> None:
    parts = [_part(["a"], [10.0], 0.5), _part(["b"], [10.2], 0.5), _part(["c"], [14.0], 0.5)]
    marks = mark_group(parts, "fid", higher_is_better=False)
    assert marks.bold == (False, False, False)
    assert marks.tie == (True, True, False), "best and runner-up within noise; the clear loser is no tie"
    clear = mark_group([_part(["a"], [10.0], 0.2), _part(["b"], [11.0], 0.2)], "fid", False)
    assert clear.bold == (True, False) and clear.tie == (False, False) and clear.tests == {"CI"}


def test_level_is_configurable() -> None:
    parts = [_part(["a"], [10.0], 0.5), _part(["b"], [10.6], 0.5)]  # p ~ 0.095
    assert mark_group(parts, "fid", False, alpha=0.05).tie == (True, True)
    assert mark_group(parts, "fid", False, alpha=0.2).bold == (True, False)


def test_without_uncertainty_nothing_is_claimed_except_exact_values() -> None:
    parts = [_part(["a"], [1.0]), _part(["b"], [2.0])]
    none = mark_group(parts, "fid", False)
    assert none.bold == (False, False) and none.tie == (False, False) and not none.tests
    exact = mark_group([_part(["a"], [5.0], key="weight_bytes"), _part(["b"], [7.0], key="weight_bytes")],
                       "weight_bytes", False)
    assert exact.bold == (True, False)


def test_seeds_are_tested_by_welch() -> None:
    spread = [_part(["a", "a2"], [10.0, 12.0]), _part(["b", "b2"], [11.0, 13.0])]
    assert compare(spread[0], spread[1], "fid").tests == ("seeds",)
    assert mark_group(spread, "fid", False).tie == (True, True)
    tight = [_part(["a", "a2"], [10.0, 10.1]), _part(["b", "b2"], [12.0, 12.1])]
    assert mark_group(tight, "fid", False).bold == (True, False)
    # with CIs as well, both tests must reject: wide CIs keep it a tie though the seeds agree
    both = [_part(["a", "a2"], [10.0, 10.1], 3.0), _part(["b", "b2"], [12.0, 12.1], 3.0)]
    res = compare(both[0], both[1], "fid")
    assert set(res.tests) == {"CI", "seeds"} and res.p_value > 0.05


def _save(tmp: Path, name: str, sample: U.SampleSet, settings: U.Bootstrap) -> tuple[Path, float]:
    boot = U.bootstrap_statistics(sample, settings, ["psnr_vs_fp"])
    path = sample.save(tmp / f"{name}.safetensors",
                       {"n": len(sample), "resamples": settings.resamples, "level": settings.level,
                        "bootstrap_seed": settings.seed, "max_rows": settings.max_rows, "eval_seed": 0,
                        "sampler": "ddim/50", "extractor": "lenet"}, boot)
    return path, float(sample.psnr.mean())


def test_paired_evidence_resolves_what_unpaired_intervals_cannot(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    shared = g.normal(25.0, 3.0, 500)  # per-sample difficulty both runs share (same eval noise)
    settings = U.Bootstrap(resamples=200)
    pa, va = _save(tmp_path, "a", U.SampleSet(psnr=shared + 0.3 + g.normal(0, 0.1, 500)), settings)
    pb, vb = _save(tmp_path, "b", U.SampleSet(psnr=shared + g.normal(0, 0.1, 500)), settings)
    half = 1.96 * 3.0 / np.sqrt(500)  # each run's own CI is ~ +-0.26: the 0.3 gap is inside both
    parts = [_part(["a"], [va], half, "psnr_vs_fp"), _part(["b"], [vb], half, "psnr_vs_fp")]
    assert mark_group(parts, "psnr_vs_fp", True).tie == (True, True)
    evidence = Evidence({"a": pa, "b": pb})
    paired = mark_group(parts, "psnr_vs_fp", True, evidence=evidence)
    assert paired.bold == (True, False) and paired.tests == {"paired bootstrap"}
    # another eval seed means other samples: no pairing, back to the intervals
    other = U.SampleSet(psnr=shared)
    pc = other.save(tmp_path / "c.safetensors", {"n": 500, "resamples": 200, "level": 0.95, "bootstrap_seed": 0,
                                                 "max_rows": settings.max_rows, "eval_seed": 1, "sampler": "ddim/50",
                                                 "extractor": "lenet"},
                    U.bootstrap_statistics(other, settings, ["psnr_vs_fp"]))
    assert compare(parts[0], parts[1].assign(run_id="c"), "psnr_vs_fp", Evidence({"a": pa, "c": pc})).tests == ("CI",)


def test_fid_and_unbiased_metric_ordering_flags() -> None:
    assert ordering_flags({"fid": [19.7, 22.2, 36.0], "kid": [17.9, 9.0, 18.0]}) == {"kid": (True, True, False)}
    flags = ordering_flags({"fid": [19.7, 22.2], "fid_inf": [15.0, 17.0], "kid": [17.9, 9.0]})
    assert flags == {"fid_inf": (False, False), "kid": (True, True)}, "each unbiased metric is checked on its own"
    assert ordering_flags({"fid": [1.0, 2.0], "kid": [1.0, float("nan")]}) == {}, "one row with KID: no ordering"
    assert ordering_flags({"kid": [1.0, 2.0]}) == {}


def _record(i: int, method: str, fid: float, kid: float) -> RunRecord:
    metrics = {"fid": fid, "kid": kid, "fid_ci_lo": fid - 0.3, "fid_ci_hi": fid + 0.3, "kid_ci_lo": kid - 0.5,
               "kid_ci_hi": kid + 0.5, "ci_level": 0.95, "ci_resamples": 200.0}
    return RunRecord(f"r{i}", "ddpm_mnist", method, "w4a8", seed=0, backend="fake", sampler="ddim", metrics=metrics,
                     status="finished", created=f"2026-01-01T00:00:0{i}+00:00")


def test_table_flags_disagreement_and_explains_marks() -> None:
    frame = records_frame([_record(1, "rtn", 19.7, 17.9), _record(2, "tfmq", 22.2, 9.0)])
    table = make_table(frame, "quality", ["fid", "kid"])
    rtn, tfmq = table.rows
    assert rtn.cells[0].bold and rtn.cells[0].flags == tfmq.cells[0].flags == ("kid",), "FID: RTN better, KID disagrees"
    assert tfmq.cells[1].bold and not tfmq.cells[1].flags
    md = to_markdown(table)
    assert "**19.70 ± 0.30** §" in md and "§: FID and KID" in md and "‡" not in md
    tex = to_latex(table)
    assert r"\textbf{19.70$\pm$0.30}$^\S$" in tex and r"$^\S$: FID and KID" in tex
    assert "ci_level" not in [m.key for m in make_table(frame, "quality").metrics], "settings are no columns"
    with pytest.raises(ValueError, match="alpha"):
        make_table(frame, "quality", alpha=1.5)


def test_each_unbiased_metric_flags_with_its_own_mark(tmp_path: Path) -> None:
    # FID and FID_inf agree (RTN first), KID disagrees (TFMQ-DM first); then FID_inf disagrees too
    agree = [_record(1, "rtn", 19.5, 18.0), _record(2, "tfmq", 25.8, 11.3)]
    for rec, fid_inf in zip(agree, (13.2, 21.0), strict=True):
        rec.metrics["fid_inf"] = fid_inf
    rtn, tfmq = make_table(records_frame(agree), "quality", ["fid", "fid_inf", "kid"]).rows
    assert rtn.cells[0].flags == tfmq.cells[0].flags == ("kid",), "FID_inf agreeing does not hide KID's ordering"
    agree[1].metrics["fid_inf"] = 12.0
    table = make_table(records_frame(agree), "quality", ["fid", "fid_inf", "kid"])
    assert [r.cells[0].flags for r in table.rows] == [("fid_inf", "kid")] * 2
    md = to_markdown(table)
    assert "‡ §" in md and "‡: FID and FID∞" in md and "§: FID and KID" in md
    if shutil.which("pdflatex"):
        (tmp_path / "t.tex").write_text(to_latex(table, standalone=True))
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:]
