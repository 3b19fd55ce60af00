"""Aggregator: golden Markdown for a small synthetic store, bold best by direction, FP first, seeds,
filters, ablation and latency tables, LaTeX that pdflatex compiles, CSV, the TFE plot and the CLI."""

from __future__ import annotations

import io
import shutil
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from harness.aggregate.cli import STAMP_FILE, aggregate, main
from harness.aggregate.frame import filter_frame, records_frame
from harness.aggregate.metric_info import metric_info
from harness.aggregate.plots import curve_series, plot_temporal_error
from harness.aggregate.render import tex_escape, to_csv, to_latex, to_markdown
from harness.aggregate.table import make_table
from harness.store import ResultsStore, RunRecord

STEPS = [900, 600, 300, 0]


def _with_ci(metrics: dict[str, float], half: float = 0.05) -> dict[str, float]:
    """The metrics with a bootstrap CI of +- `half` around each, as a run records them (issue 13)."""
    out = dict(metrics, ci_level=0.95, ci_resamples=200.0)
    for k, v in metrics.items():
        out[f"{k}_ci_lo"], out[f"{k}_ci_hi"] = v - half, v + half
    return out


def _rec(i: int, model: str, method: str, bits: str, seed: int = 0, variant: str | None = None,
         kind: str = "quality", backend: str = "fake", status: str = "finished", **metrics: float) -> RunRecord:
    curves = {} if method == "fp" else {"timesteps": STEPS, "temporal_feature_error": [0.4, 0.3, 0.2, 0.1 * i]}
    metrics = _with_ci(metrics) if kind == "quality" and metrics else metrics
    return RunRecord(f"r{i:02d}", model, method, bits, kind=kind, status=status, seed=seed, variant=variant,
                     backend=backend, sampler="ddim", metrics=metrics, curves=curves,
                     created=f"2026-01-01T00:00:{i:02d}+00:00")


def _records() -> list[RunRecord]:
    recs = [
        _rec(1, "ddpm_mnist", "tfmq", "w4a8", seed=0, fid=9.2, sfid=11.0, **{"is": 8.9}),
        _rec(2, "ddpm_mnist", "tfmq", "w4a8", seed=1, fid=9.4, sfid=11.2, **{"is": 8.7}),
        _rec(3, "ddpm_mnist", "rtn", "w4a8", fid=12.0, sfid=10.5, **{"is": 8.0}),
        _rec(4, "ddpm_mnist", "qdiff", "w4a8", fid=10.0, sfid=12.0, **{"is": 8.95}),
        _rec(5, "ddpm_mnist", "rtn", "w8a8", fid=6.5, sfid=7.0, **{"is": 9.0}),
        _rec(6, "ddpm_mnist", "tfmq", "w8a8", fid=6.1, sfid=7.0, **{"is": 9.05}),
        _rec(7, "ddpm_mnist", "fp", "w32a32", fid=5.0, sfid=6.0, **{"is": 9.1}),
        _rec(8, "cifar", "tfmq", "w4a8", fid=20.0, **{"is": 7.0}),
        _rec(9, "cifar", "fp", "w32a32", fid=18.0, **{"is": 7.5}),
        _rec(10, "ddpm_mnist", "tfmq", "w4a8", variant="no_tiar", fid=9.9, sfid=11.5, **{"is": 8.5}),
        _rec(11, "ddpm_mnist", "tfmq", "w4a8", variant="no_fsc", fid=9.6, sfid=11.1, **{"is": 8.6}),
        _rec(12, "ddpm_mnist", "fp", "w32a32", kind="latency", backend="openvino", latency_ms_b1=10.0,
             latency_ms_b4=20.0, ms_per_image_b4=5.0, weight_bytes=2e6),
        _rec(13, "ddpm_mnist", "rtn", "w8a8", kind="latency", backend="openvino", latency_ms_b1=14.0,
             weight_bytes=5e5),
        _rec(14, "ddpm_mnist", "rtn", "w4a8", status="failed"),
    ]
    return recs


@pytest.fixture
def frame() -> pd.DataFrame:
    return records_frame(_records())


GOLDEN_QUALITY = """\
Sample quality of each PTQ method per model and bit-width, against the FP model.

| Model | Bits | Method | n | FID↓ | sFID↓ | IS↑ | TFE↓ |
|---|---|---|---|---:|---:|---:|---:|
| cifar | w32a32 | FP | 1 | 18.00 ± 0.05 | – | 7.50 ± 0.05 | – |
|  | w4a8 | TFMQ-DM | 1 | 20.00 ± 0.05 | – | 7.00 ± 0.05 | 0.425 |
| ddpm_mnist | w32a32 | FP | 1 | 5.00 ± 0.05 | 6.00 ± 0.05 | 9.10 ± 0.05 | – |
|  | w8a8 | RTN | 1 | 6.50 ± 0.05 | 7.00 ± 0.05 ≈ | 9.00 ± 0.05 ≈ | 0.350 |
|  |  | TFMQ-DM | 1 | **6.10 ± 0.05** | 7.00 ± 0.05 ≈ | 9.05 ± 0.05 ≈ | 0.375 |
|  | w4a8 | RTN | 1 | 12.00 ± 0.05 | **10.50 ± 0.05** | 8.00 ± 0.05 | 0.300 |
|  |  | Q-Diffusion | 1 | 10.00 ± 0.05 | 12.00 ± 0.05 | **8.95 ± 0.05** | 0.325 |
|  |  | TFMQ-DM | 2 | **9.30 ± 0.14** | 11.10 ± 0.14 | 8.80 ± 0.14 | 0.262 ± 0.018 |
"""


def test_golden_quality_markdown(frame: pd.DataFrame) -> None:
    table = make_table(frame, "quality")
    md = to_markdown(table)
    assert md.startswith(GOLDEN_QUALITY) and md[len(GOLDEN_QUALITY):] == "".join(f"\n{n}\n" for n in table.notes)
    assert table.notes[0] == ("Cells: mean ± std over seeds (n > 1); value ± half-width of its 95 % bootstrap CI "
                              "over the eval samples (n = 1, 200 resamples); n: seeds averaged in a row.")
    assert table.notes[1].startswith("Bold: significantly better than every other row of its group at alpha = 0.05 "
                                     "(tests: the runs' bootstrap intervals;")


def test_fp_first_per_model_and_bits_order(frame: pd.DataFrame) -> None:
    table = make_table(frame, "quality")
    first = {}
    for row in table.rows:
        first.setdefault(row.group[0], row.label[0])
    assert first == {"cifar": "FP", "ddpm_mnist": "FP"}
    assert [r.group[1] for r in table.rows if r.group[0] == "ddpm_mnist"] == ["w32a32"] + ["w8a8"] * 2 + ["w4a8"] * 3


def test_bold_respects_direction_and_groups(frame: pd.DataFrame) -> None:
    table = make_table(frame, "quality", ["fid", "is"])
    w4 = {r.label[0]: r.cells for r in table.rows if r.group == ("ddpm_mnist", "w4a8")}
    assert [w4[m][0].bold for m in ("RTN", "Q-Diffusion", "TFMQ-DM")] == [False, False, True], "FID: lower wins"
    assert [w4[m][1].bold for m in ("RTN", "Q-Diffusion", "TFMQ-DM")] == [False, True, False], "IS: higher wins"
    fp = [r for r in table.rows if r.label == ("FP",)]
    assert not any(c.bold for r in fp for c in r.cells), "a one-row group has nothing to beat"


def test_seeds_give_mean_std_and_n(frame: pd.DataFrame) -> None:
    row = next(r for r in make_table(frame, "quality").rows if r.group == ("ddpm_mnist", "w4a8")
               and r.label == ("TFMQ-DM",))
    assert row.n == 2 and row.cells[0].mean == pytest.approx(9.3)
    assert row.cells[0].std == pytest.approx(0.1414, abs=1e-4)
    single = records_frame([r for r in _records() if r.run_id != "r02"])
    table = make_table(single, "quality")
    assert "| n |" not in to_markdown(table), "no n column with one seed per row"
    shown = [(m.key, c) for r in table.rows for m, c in zip(table.metrics, r.cells, strict=True) if c.mean is not None]
    assert all(c.std is None for _, c in shown), "no std with one seed"
    assert all((c.ci is not None) == (key != "tfe") for key, c in shown), "a single run shows its bootstrap CI"


def test_filters_keep_fp_as_reference(frame: pd.DataFrame) -> None:
    w8 = make_table(filter_frame(frame, bits=["w8a8"]), "quality")
    assert {r.group for r in w8.rows} == {("ddpm_mnist", "w32a32"), ("ddpm_mnist", "w8a8"), ("cifar", "w32a32")}
    only = make_table(filter_frame(frame, model=["cifar"], method=["tfmq"]), "quality")
    assert [(r.group, r.label) for r in only.rows] == [(("cifar", "w4a8"), ("TFMQ-DM",))]
    with pytest.warns(UserWarning, match=r"--model \['cfar'\] not in the store.*cifar"):
        assert filter_frame(frame, model=["cfar"]).empty


def test_headers_arrows_and_unknown_metric(frame: pd.DataFrame) -> None:
    table = make_table(frame, "quality", ["is", "fid", "calib_seconds"])
    assert [m.display + m.arrow for m in table.metrics] == ["IS↑", "FID↓"], "requested order; absent dropped"
    assert metric_info("calib_seconds").display + metric_info("calib_seconds").arrow == "calib time (s)↓"
    assert metric_info("weight_bytes").format(2.5e6) == "2.50" and metric_info("psnr_vs_fp").arrow == "↑"
    assert metric_info("my_score").arrow == "" and metric_info("my_score").display == "my_score"
    with pytest.raises(ValueError, match="Did you mean 'sfid'"):
        make_table(frame, "quality", ["sfdi"])


def test_failed_runs_and_duplicate_seeds() -> None:
    recs = _records()
    assert "r14" not in set(records_frame(recs)["run_id"]), "failed runs are not tabulated"
    rerun = _rec(20, "ddpm_mnist", "rtn", "w8a8", fid=6.0, sfid=7.0, **{"is": 9.0})
    with pytest.warns(UserWarning, match=r"r05"):
        frame = records_frame([*recs, rerun])
    rows = make_table(frame, "quality").rows
    row = next(r for r in rows if r.group == ("ddpm_mnist", "w8a8") and r.label == ("RTN",))
    assert row.n == 1 and row.cells[0].mean == 6.0, "the newest record of a config+seed wins, never averaged"


def test_other_axes_that_vary_become_columns() -> None:
    recs = [_rec(1, "m", "rtn", "w8a8", fid=7.0), _rec(2, "m", "rtn", "w8a8", backend="int8", fid=7.5)]
    table = make_table(records_frame(recs), "quality")
    assert table.label_cols == ("Method", "Backend") and [r.label for r in table.rows] == [
        ("RTN", "fake"), ("RTN", "int8")], "different backends are never averaged as seeds"


def test_ablation_and_latency_tables(frame: pd.DataFrame) -> None:
    ablation = make_table(frame, "ablation")
    assert ablation.label_cols == ("Method", "Variant")
    assert [r.label[1] for r in ablation.rows] == ["no_fsc", "no_tiar", "full"]
    assert {r.group for r in ablation.rows} == {("ddpm_mnist", "w4a8")}, "only ablated groups"
    latency = make_table(frame, "latency")
    assert latency.group_cols == ("Model", "Backend")
    assert [m.key for m in latency.metrics] == ["latency_ms_b1", "ms_per_image_b4", "weight_bytes"], "per batch"
    assert [m.display for m in latency.metrics] == ["ms/call, batch 1", "ms/image, batch 4", "weight MB"]
    assert [r.label for r in latency.rows] == [("w32a32", "FP"), ("w8a8", "RTN")]
    md = to_markdown(latency)
    assert "0.50" in md and "2.00" in md and "weight MB: packed weight memory (10⁶ bytes)" in md, "bytes as MB"
    assert "| 14.00 | – | **0.50** |" in md, "a batch size a record did not measure is an empty cell"
    assert make_table(records_frame([_rec(1, "m", "rtn", "w8a8", fid=1.0)]), "latency").rows == ()


def test_latex_structure_and_escaping(frame: pd.DataFrame) -> None:
    tex = to_latex(make_table(frame, "quality"), caption="W4A8 & co_1")
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"FID$\downarrow$" in tex and r"IS$\uparrow$" in tex
    assert r"ddpm\_mnist" in tex and r"\textbf{9.30$\pm$0.14}" in tex and r"\caption{W4A8 \& co\_1. Cells: mean" in tex
    assert tex.count(r"\midrule") == 2 and tex.count(r"\cmidrule") == 3
    assert tex_escape(r"a_b%c$d#e{f}g~h^i\j") == (r"a\_b\%c\$d\#e\{f\}g\textasciitilde{}h"
                                                 r"\textasciicircum{}i\textbackslash{}j")


def _wide_frame() -> pd.DataFrame:
    """Every default quality column, as the reference sweep's table has them: wider than a page."""
    many = dict(fid=23.88, fid_inf=18.49, sfid=2.88, kid=9.8043, psnr_vs_fp=25.96, calib_seconds=334.6,
                **{"is": 8.17})
    return records_frame([_rec(i, "ddpm_mnist_cond", m, "w4a8", **{k: v + i for k, v in many.items()})
                          for i, m in enumerate(("rtn", "ptq4dm", "qdiff", "tfmq"))])


def test_latex_fits_the_page_with_caption_label_and_units(frame: pd.DataFrame) -> None:
    wide = to_latex(make_table(_wide_frame(), "quality"))
    assert r"\resizebox{\linewidth}{!}{%" in wide and r"\small" in wide and r"\label{tab:quality}" in wide
    assert "KID: unscaled" in wide and r"\caption{Sample quality" in wide
    assert r"\resizebox" not in to_latex(make_table(frame, "quality", ["fid"])), "a table that fits is not scaled"
    latency = to_latex(make_table(frame, "latency"))
    assert "ms/call, batch 1" in latency and r"\label{tab:latency}" in latency


def test_extractor_named_in_headers_and_caption() -> None:
    def rec(i: int, model: str, dataset: str) -> RunRecord:
        cfg = {"eval": {"extractor": "auto", "n_samples": 1000}, "model": {"dataset": dataset}}
        return replace(_rec(i, model, "rtn", "w8a8", fid=7.0), config=cfg)

    lenet = make_table(records_frame([rec(1, "ddpm_mnist", "mnist")]), "quality")
    assert lenet.metrics[0].display == "LeNet-FID" and any("LeNet-5 features" in n for n in lenet.notes)
    assert "over the 1,000 eval samples" in lenet.notes[0]
    mixed = make_table(records_frame([rec(1, "ddpm_mnist", "mnist"), rec(2, "cifar", "cifar10")]), "quality")
    assert mixed.metrics[0].display == "FID" and any("InceptionV3 features otherwise" in n for n in mixed.notes)


def test_number_formats_are_per_metric_and_column() -> None:
    tfe = metric_info("tfe")
    assert [tfe.format(v, tfe.column_decimals([1.014e-07, 0.0392])) for v in (1.014e-07, 0.0392)] == ["0.0000",
                                                                                                    "0.0392"]
    assert metric_info("kid").column_decimals([4.3, 14.7]) == 1 and metric_info("fid").format(12.7326) == "12.73"
    md = to_markdown(make_table(_wide_frame(), "quality"))
    assert "e-0" not in md and "±0.000000" not in md


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles_with_pdflatex_without_overfull_boxes(frame: pd.DataFrame, tmp_path: Path) -> None:
    tables = {"synthetic": make_table(frame, "quality"), "wide": make_table(_wide_frame(), "quality"),
              "latency": make_table(frame, "latency"), "ablation": make_table(frame, "ablation")}
    for name, table in tables.items():
        (tmp_path / f"{name}.tex").write_text(to_latex(table, standalone=True))
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"{name}.tex"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:]
        assert (tmp_path / f"{name}.pdf").stat().st_size > 1000
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert "Overfull \\hbox" not in log, f"{name} overflows the page: {log[log.find('Overfull'):][:300]}"


def test_csv_has_raw_means_and_stds(frame: pd.DataFrame) -> None:
    df = pd.read_csv(io.StringIO(to_csv(make_table(frame, "quality", ["fid", "is"]))))
    assert list(df.columns) == ["Model", "Bits", "Method", "n", *(f"{k}{s}" for k in ("fid", "is")
                                                                   for s in ("", "_std", "_ci_lo", "_ci_hi", "_mark"))]
    tfmq = df[(df["Model"] == "ddpm_mnist") & (df["Bits"] == "w4a8") & (df["Method"] == "TFMQ-DM")].iloc[0]
    assert tfmq["fid"] == pytest.approx(9.3) and tfmq["fid_std"] == pytest.approx(0.141421, abs=1e-6)
    assert tfmq["n"] == 2 and len(df) == 8


def test_temporal_error_plot(tmp_path: Path) -> None:
    series = curve_series(_records())
    assert list(series) == [("cifar", "w4a8"), ("ddpm_mnist", "w8a8"), ("ddpm_mnist", "w4a8")]
    tfmq = series[("ddpm_mnist", "w4a8")]["tfmq"]
    assert tfmq.steps == STEPS and tfmq.n == 2 and tfmq.mean[-1] == pytest.approx((0.1 + 0.2) / 2)
    assert (tfmq.lo[-1], tfmq.hi[-1]) == pytest.approx((0.1, 0.2)), "the band spans the seeds (min-max)"
    assert "fp" not in series[("ddpm_mnist", "w4a8")], "FP is the reference, its error is zero"
    png = plot_temporal_error(_records(), tmp_path / "tfe.png")
    assert png is not None and png.with_suffix(".pdf").read_bytes().startswith(b"%PDF"), "PNG and PDF"
    width, height = Image.open(png).size
    assert 2000 < width < 3000 and 500 < height < 800, "3 panels fit one row of a grid that wraps after 3"
    records = _records() + [_rec(30 + i, f"m{i}", "rtn", "w8a8", fid=1.0) for i in range(2)]
    wrapped = plot_temporal_error(records, tmp_path / "tfe5.png")
    assert Image.open(wrapped).size[1] > 1.8 * height, "5 panels wrap into a second row"
    assert plot_temporal_error([_rec(1, "m", "fp", "w32a32")], tmp_path / "none.png") is None


def test_one_colour_per_method_everywhere(tmp_path: Path) -> None:
    """The palette is keyed by method, so a method keeps its colour whatever else a panel shows."""
    from matplotlib.colors import to_hex

    from harness.aggregate.style import METHOD_COLORS, grid_shape, method_color

    assert method_color("tfmq") == METHOD_COLORS["tfmq"] and method_color("new_a") != method_color("new_b")
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert [grid_shape(n) for n in (1, 3, 4, 7)] == [(1, 1), (1, 3), (2, 3), (3, 3)]
    import harness.aggregate.plots as plots

    seen: dict[str, set[str]] = {}
    original = plots.save

    def spy(fig, path):  # read the line colours of the figure the plot builds
        for ax in fig.axes:
            for line in ax.get_lines():
                seen.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
        for text, handle in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles, strict=True):
            seen.setdefault(text.get_text(), set()).add(to_hex(handle.get_color()))
        return original(fig, path)

    plots.save = spy
    try:
        plot_temporal_error(_records(), tmp_path / "c.png")
    finally:
        plots.save = original
    assert seen["TFMQ-DM"] == {METHOD_COLORS["tfmq"].lower()} and seen["RTN"] == {METHOD_COLORS["rtn"].lower()}


def test_cli_writes_every_format_and_survives_corrupt_files(tmp_path: Path, capsys) -> None:
    store = ResultsStore(tmp_path / "store")
    for rec in _records():
        store.write(rec)
    (tmp_path / "store" / "broken.json").write_text('{"schema_version": 1, "run_')
    out = tmp_path / "tables"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI reports warnings itself
        assert main(["--store", str(store.root), "--out", str(out), "--format", "all"]) == 0
    printed = capsys.readouterr()
    names = sorted(p.name for p in out.iterdir() if p.name != STAMP_FILE)
    assert names == sorted(f"{k}.{e}" for k in ("quality", "ablation", "latency") for e in ("md", "tex", "csv")) + [
        "temporal_feature_error.pdf", "temporal_feature_error.png"]
    assert all(f"wrote {out / n}" in printed.out for n in names)
    assert "broken.json" in printed.err
    assert (out / "quality.md").read_text().startswith(GOLDEN_QUALITY)

    assert main(["--store", str(store.root), "--out", str(tmp_path / "t2"), "--format", "md",
                 "--kind", "quality", "--bits", "w8a8", "--metrics", "fid"]) == 0
    assert sorted(p.name for p in (tmp_path / "t2").iterdir()) == [STAMP_FILE, "quality.md",
                                                                   "temporal_feature_error.pdf",
                                                                   "temporal_feature_error.png"]
    assert "w4a8" not in (tmp_path / "t2" / "quality.md").read_text()
    assert main(["--store", str(store.root), "--out", str(out), "--format", "pdf"]) == 2
    assert main(["--store", str(tmp_path / "empty"), "--out", str(out)]) == 1
    assert "nothing written" in capsys.readouterr().err


def test_feature_files_fall_back_to_the_store_copy(tmp_path: Path) -> None:
    """A fresh clone has no outputs/ folder: the paired tests read <store>/features/<run_id>.safetensors."""
    from harness.aggregate.cli import feature_files
    from harness.store import RunRecord

    store = tmp_path / "store"
    (store / "features").mkdir(parents=True)
    kept = store / "features" / "bbb.safetensors"
    kept.write_bytes(b"x")
    own = tmp_path / "own.safetensors"
    own.write_bytes(b"x")
    records = [RunRecord(run_id="aaa", model="m", method="rtn", bits="w8a8", artifacts={"eval_features": str(own)}),
               RunRecord(run_id="bbb", model="m", method="rtn", bits="w8a8",
                         artifacts={"eval_features": str(tmp_path / "gone.safetensors")}),
               RunRecord(run_id="ccc", model="m", method="rtn", bits="w8a8")]
    assert feature_files(store, records) == {"aaa": own, "bbb": kept}


def test_sweep_ends_with_its_own_table_on_the_console(tmp_path: Path, capsys) -> None:
    """The callback prints the quality table of the sweep's runs only; a log (no TTY) keeps bold as **...**."""
    from harness.callbacks import print_sweep_tables

    store = ResultsStore(tmp_path / "store")
    for rec in _records():
        store.write(rec)
    print_sweep_tables(store.root, {"r03", "r04", "r01", "r02"})  # ddpm_mnist W4A8, resumed: no FP in the ledger
    out = capsys.readouterr().out
    assert "Sample quality of each PTQ method" in out and "Q-Diffusion" in out and "**9.30 ± 0.14**" in out
    assert "w32a32" in out and "5.00 ± 0.05" in out, "the FP reference of the sweep's model is its first row"
    assert "cifar" not in out and "w8a8" not in out, "runs of other sweeps are not this sweep's table"
    assert "Cells: mean ± std over seeds" in out, "the notes say what ± means"
    print_sweep_tables(tmp_path / "missing", {"x"})
    assert capsys.readouterr().out == "", "nothing to print is not an error"


def test_unchanged_inputs_skip_the_regeneration_and_any_change_redoes_it(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    records = _records()
    for rec in records:
        store.write(rec)
    out = tmp_path / "tables"
    assert aggregate(store.root, out, skip_unchanged=True), "no tables yet: written"
    (out / "quality.md").write_text("stale")
    assert aggregate(store.root, out, skip_unchanged=True) == [], "same records, settings and code: nothing to do"
    assert (out / "quality.md").read_text() == "stale"
    assert aggregate(store.root, out, alpha=0.1, skip_unchanged=True), "other settings: regenerated"
    assert aggregate(store.root, out, alpha=0.1, skip_unchanged=True) == []
    store.write(replace(records[0], metrics={**records[0].metrics, "fid": 99.0}))
    assert aggregate(store.root, out, alpha=0.1, skip_unchanged=True), "a changed record: regenerated"
    assert aggregate(store.root, out), "without skip_unchanged (the CLI) it always writes"
