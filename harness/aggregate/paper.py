"""Published numbers beside measured ones: the "paper" table of `python -m harness.aggregate --paper`.

results/paper/*.csv hold what papers report for the settings of conf/experiment/paper_*.yaml, one number
per row with its source (see results/paper/README.md). The table groups by (model, bit-width) like the
quality table; in each group the harness's own rows come first ("this harness"), then every published
number with its provenance as the row label ("TFMQ-DM paper, self-reported, as quoted by ..."). Nothing is
bold: numbers from different protocols and runs are shown side by side, not ranked. Groups appear only
where a paper number exists; empty (unconfirmed) values stay empty cells.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pandas as pd

from harness.aggregate.metric_info import metric_info
from harness.aggregate.table import METHOD_LABELS, Cell, Row, Table, build_table, select_records, sort_key

PAPER_DIR = Path("results/paper")
COLUMNS = ("preset", "model", "bits", "method", "metric", "value", "flag", "run_by", "paper", "table", "seen_in",
           "verification", "note")
FLAGS = ("self-reported", "re-run")
SOURCE_KEYS = ("flag", "run_by", "paper", "table", "seen_in", "verification")
MEASURED = "this harness"
PAPER_METRICS = ("fid", "sfid", "is", "clip_score")
PAPER_NOTES = ("Nothing is bold: the rows come from different protocols, runs and feature extractors and are "
               "shown side by side, not ranked. Measured cells: value ± half-width of its bootstrap CI (one seed) "
               "or mean ± std over n seeds. Published numbers: as reported, the source file names the paper and "
               "table.",)


def read_paper_numbers(folder: Path = PAPER_DIR) -> pd.DataFrame:
    """Every row of folder/*.csv; a missing column, a row without its source or a bad value is an error."""
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise ValueError(f"no paper numbers in {folder}: expected *.csv with columns {', '.join(COLUMNS)}")
    parts = []
    for f in files:
        part = pd.read_csv(f, dtype=str, keep_default_na=False)
        missing = [c for c in COLUMNS if c not in part.columns]
        if missing:
            raise ValueError(f"{f} lacks columns {missing}; expected {', '.join(COLUMNS)}")
        for i, row in part.iterrows():
            where = f"{f}:{int(i) + 2}"
            unsourced = [k for k in SOURCE_KEYS if not row[k].strip()]
            if unsourced:
                raise ValueError(f"{where}: every number needs its source; empty {unsourced}")
            if row["flag"] not in FLAGS:
                raise ValueError(f"{where}: flag={row['flag']!r} must be one of {', '.join(FLAGS)}")
            if row["value"].strip() and not math.isfinite(float(row["value"])):
                raise ValueError(f"{where}: value={row['value']!r} is not a finite number")
        parts.append(part.assign(file=f.name))
    out = pd.concat(parts, ignore_index=True)
    out["value"] = pd.to_numeric(out["value"].where(out["value"].str.strip() != ""), errors="raise")
    return out


def source_label(row: pd.Series) -> str:
    """The provenance in a paper row's label: who ran it, the paper, the CSV file (which holds the rest)."""
    who = "self-reported" if row["flag"] == "self-reported" else f"re-run by {row['run_by']}"
    return f"paper: {who}, {row['paper'].split(' (')[0].split(':')[0]} [{row['file']}]"


def paper_rows(numbers: pd.DataFrame, metrics: tuple[str, ...]) -> dict[tuple[str, str], list[Row]]:
    """(model, bits) -> one row per (method, source), cells in `metrics` order (empty where not reported)."""
    out: dict[tuple[str, str], list[Row]] = {}
    numbers = numbers.assign(source=numbers.apply(source_label, axis=1))
    for (model, bits, method, source), part in numbers.groupby(["model", "bits", "method", "source"], sort=False):
        values = dict(zip(part["metric"], part["value"], strict=True))
        cells = tuple(Cell(None, None, 0) if pd.isna(values.get(k)) else Cell(float(values[k]), None, 1)
                      for k in metrics)
        label = (METHOD_LABELS.get(method, method), source)
        out.setdefault((model, bits), []).append(Row((model, bits), label, 1, cells))
    return out


def paper_table(frame: pd.DataFrame, numbers: pd.DataFrame, metrics: tuple[str, ...] = ()) -> Table:
    """Measured quality rows and published numbers, grouped by (model, bits), nothing bold."""
    metrics = tuple(metrics) or tuple(k for k in PAPER_METRICS if numbers.loc[numbers["metric"] == k, "value"]
                                      .notna().any() or k in frame.columns)
    published = paper_rows(numbers, metrics)
    measured: dict[tuple[str, str], list[Row]] = {}
    part = select_records(frame, "quality") if len(frame) else frame
    part = part[[(m, b) in published for m, b in zip(part["model"], part["bits"], strict=True)]] if len(part) else part
    if len(part):
        for row in build_table(part, "paper", list(metrics), ("model", "bits"), ("method",)).rows:
            cells = tuple(replace(c, bold=False) for c in row.cells)
            measured.setdefault(row.group, []).append(Row(row.group, (" / ".join(row.label), MEASURED), row.n, cells))
    rows: list[Row] = []
    for group in sorted(published, key=lambda g: (sort_key("model", g[0]), sort_key("bits", g[1]))):
        rows += measured.get(group, []) + published[group]
    return Table("paper", ("Model", "Bits"), ("Method", "Source"), tuple(metric_info(k) for k in metrics),
                 tuple(rows), PAPER_NOTES, "Measured rows beside the numbers papers publish for the same setting")
