"""`python -m harness.aggregate`: the results store -> paper-style tables and the TFE plot.

Tables are rebuilt from the store alone (never from W&B), so they can be regenerated any time,
e.g. after a sweep (`aggregate()` is what a Hydra `on_multirun_end` callback would call).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from harness.aggregate.frame import filter_frame, records_frame
from harness.aggregate.paper import PAPER_DIR, paper_table, read_paper_numbers
from harness.aggregate.plots import plot_temporal_error
from harness.aggregate.render import RENDERERS
from harness.aggregate.significance import ALPHA, Evidence
from harness.aggregate.table import LAYOUTS, Table, make_table
from harness.store import ResultsStore, RunRecord

FORMATS = ("latex", "md", "csv")
PLOT_FILE = "temporal_feature_error.png"
STAMP_FILE = ".inputs.sha256"  # what the tables in a folder were made from (see `inputs_fingerprint`)


def _csv_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def feature_files(store: Path, records: Sequence[RunRecord]) -> dict[str, Path]:
    """Each run's per-sample features for the paired tests: the file its record names (the run's
    outputs folder), else `<store>/features/<run_id>.safetensors`, where committed reference stores
    keep them so a fresh clone's tables bold what the original's did."""
    out: dict[str, Path] = {}
    for r in records:
        for path in (Path(r.artifacts.get("eval_features", "")), store / "features" / f"{r.run_id}.safetensors"):
            if path.name and path.is_file():
                out[r.run_id] = path
                break
    return out


def inputs_fingerprint(store: Path, settings: Sequence[object]) -> str:
    """A hash of everything the tables depend on: the store's record files, the names and sizes of the
    saved features, the aggregation settings and this package's code. Equal hashes mean the tables
    already written are what a regeneration would write, so a resumed sweep skips the work."""
    h = hashlib.sha256(repr(list(settings)).encode())
    files = [*sorted(store.glob("*.json")), *sorted(Path(__file__).parent.glob("*.py"))]
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for path in sorted((store / "features").glob("*.safetensors")):
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    return h.hexdigest()


def load_frame(store: Path, model: Sequence[str] = (), bits: Sequence[str] = (),
               method: Sequence[str] = ()) -> tuple[list[RunRecord], pd.DataFrame, Evidence]:
    """The store's records, their filtered table frame and the runs' saved bootstrap evidence."""
    records = ResultsStore(store).records()
    frame = filter_frame(records_frame(records), model=model, bits=bits, method=method)
    return records, frame, Evidence(feature_files(store, records))


def make_tables(frame: pd.DataFrame, evidence: Evidence, kinds: Sequence[str] = tuple(LAYOUTS),
                metrics: Sequence[str] = (), alpha: float = ALPHA) -> dict[str, Table]:
    """{kind: Table} for every kind with rows (the sweep's console, the files and the report share them)."""
    tables = {kind: make_table(frame, kind, metrics, alpha, evidence) for kind in kinds}
    return {kind: table for kind, table in tables.items() if table.rows}


def aggregate(store: Path, out: Path, formats: Sequence[str] = FORMATS, metrics: Sequence[str] = (),
              kinds: Sequence[str] = tuple(LAYOUTS), model: Sequence[str] = (), bits: Sequence[str] = (),
              method: Sequence[str] = (), paper: Path | None = None, alpha: float = ALPHA,
              skip_unchanged: bool = False) -> list[Path]:
    """Write <out>/<kind>.<ext> for every kind with records, and the TFE figure (PNG and PDF); with `paper`
    (a folder of published numbers, results/paper), also <out>/paper.<ext>: those numbers beside the
    measured rows. `alpha` is the level of the significance marks (paired tests read each run's saved
    features). `skip_unchanged`: write nothing (and return []) when <out> holds the tables of exactly
    these inputs (the end of a sweep that resumed every run)."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"<--format={fmt}> is not a table format; accepted: {', '.join(FORMATS)}, all")
    settings = [*(list(v) for v in (formats, metrics, kinds, model, bits, method)), str(paper), float(alpha)]
    stamp = inputs_fingerprint(store, settings)  # lists: the CLI and a sweep's callback agree
    if skip_unchanged and (out / STAMP_FILE).is_file() and (out / STAMP_FILE).read_text().strip() == stamp:
        return []
    records, frame, evidence = load_frame(store, model, bits, method)
    tables = make_tables(frame, evidence, kinds, metrics, alpha)
    if paper is not None:
        tables["paper"] = paper_table(frame, read_paper_numbers(paper), tuple(metrics))
    written: list[Path] = []
    for kind, table in tables.items():
        for fmt in formats:
            render, ext = RENDERERS[fmt]
            path = out / f"{kind}.{ext}"
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(render(table), encoding="utf-8")
            written.append(path)
    if "quality" in kinds:
        kept = set(frame["run_id"])
        plot = plot_temporal_error([r for r in records if r.run_id in kept], out / PLOT_FILE)
        written += [plot, plot.with_suffix(".pdf")] if plot else []
    if written:
        (out / STAMP_FILE).write_text(stamp + "\n", encoding="utf-8")
    else:
        (out / STAMP_FILE).unlink(missing_ok=True)  # the stamp only ever vouches for tables that exist
    return written


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.aggregate", description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path("results/store"), help="results store folder")
    p.add_argument("--out", type=Path, default=Path("results/tables"), help="where tables are written")
    p.add_argument("--format", default="all", help="latex | md | csv | all, or a comma list")
    p.add_argument("--metrics", help="comma list of metric keys, e.g. fid,sfid,is (default: per kind)")
    p.add_argument("--kind", help=f"comma list of {', '.join(LAYOUTS)} (default: every kind with records)")
    p.add_argument("--model", help="comma list of models to keep")
    p.add_argument("--bits", help="comma list of bit-widths to keep (FP rows are always kept)")
    p.add_argument("--method", help="comma list of methods to keep")
    p.add_argument("--alpha", type=float, default=ALPHA, help="significance level of bold / tie marks")
    p.add_argument("--paper", nargs="?", type=Path, const=PAPER_DIR, default=None, metavar="DIR",
                   help=f"also write paper.<ext>: published numbers (default {PAPER_DIR}) beside the measured rows")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    formats = list(FORMATS) if args.format == "all" else _csv_list(args.format)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            written = aggregate(args.store, args.out, formats, _csv_list(args.metrics),
                                _csv_list(args.kind) or list(LAYOUTS), _csv_list(args.model),
                                _csv_list(args.bits), _csv_list(args.method), args.paper, args.alpha)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if not written:
        print(f"no finished records in {args.store} match the filters; nothing written", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0
