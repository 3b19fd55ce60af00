"""Hydra callbacks: what belongs after the last run: the tables, a summary, the exit code.

Every run (and its FP reference) appends one line to a ledger (`runs.jsonl` in the sweep folder,
or in the run folder of a single run): finished, failed or resumed, with the first line of the
error. The callbacks truncate it when a sweep starts and read it when it ends, so the summary also
covers launchers whose jobs run in other processes. A sweep regenerates the tables from what
finished first, then prints the summary and the sweep's own table (its runs only, rich when
installed) and exits non-zero if any run failed; a single run exits non-zero when it (or its FP
reference) failed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

if TYPE_CHECKING:
    import pandas as pd

    from harness.store import RunRecord

log = logging.getLogger(__name__)

LEDGER_FILE = "runs.jsonl"
OUTCOMES = ("finished", "failed", "resumed")
SWEEP_TABLES = ("quality", "ablation")  # printed when a sweep ends (latency comes from harness.bench)


def ledger_path(hc: DictConfig | None = None) -> Path:
    """The ledger of the current Hydra invocation: in the sweep folder for -m, else the run folder."""
    hc = hc if hc is not None else HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir) / LEDGER_FILE
    return Path(hc.run.dir) / LEDGER_FILE


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger's entries; a torn last line (a job killed mid-append) is reported as such."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            entries.append({"run_id": "?", "outcome": "failed", "label": "?", "error": f"torn ledger line {line!r}"})
    return entries


def note_outcome(ledger: Path | None, record: RunRecord, outcome: str) -> RunRecord:
    """Append the run's outcome to the sweep's ledger (one short line: appends do not interleave)."""
    if ledger is not None:
        line = {"run_id": record.run_id, "outcome": outcome, "label": f"{record.model}/{record.method}/{record.bits}",
                "error": (record.error or "").splitlines()[0][:300] if record.error else None}
        ledger.parent.mkdir(parents=True, exist_ok=True)
        with ledger.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
    return record


def summary(entries: list[dict[str, Any]], where: Path) -> tuple[str, bool]:
    """The summary text (counts, then one line per failed run) and whether any run failed."""
    counts = {o: sum(e.get("outcome") == o for e in entries) for o in OUTCOMES}
    lines = [f"summary: {len(entries)} runs: " + ", ".join(f"{n} {o}" for o, n in counts.items()) + f" ({where})"]
    lines += [f"  FAILED {e.get('run_id')} {e.get('label')}: {e.get('error')}"
              for e in entries if e.get("outcome") == "failed"]
    return "\n".join(lines), counts["failed"] > 0


def _report_and_exit(path: Path, store: Path | None = None) -> None:
    """The summary, then (a sweep, given its store) the sweep's own tables, then the exit code."""
    entries = read_ledger(path)
    text, failed = summary(entries, path)
    print(text, flush=True)  # stdout: the last lines a user sees, whatever the logging config
    if store is not None:
        print_sweep_tables(store, {str(e.get("run_id")) for e in entries})
    if failed:
        sys.exit(1)  # SystemExit passes Hydra's callback guard (it catches Exception only)


def sweep_rows(frame: pd.DataFrame, run_ids: set[str]) -> pd.DataFrame:
    """The sweep's runs (resumed ones included) and the FP reference of each (model, backend, sampler)
    they ran with: a resumed run never recomputes its FP reference, so the ledger does not name it."""
    import pandas as pd  # here and below: the tables' imports (pandas, scipy, torch) only once a sweep ends

    from harness.aggregate.frame import FP_METHOD

    keys = pd.Series(list(zip(frame["model"], frame["backend"], frame["sampler"], strict=True)), index=frame.index)
    ours = frame["run_id"].isin(run_ids)
    return frame[ours | ((frame["method"] == FP_METHOD) & keys.isin(set(keys[ours])))]


def print_sweep_tables(store: Path, run_ids: set[str]) -> None:
    """The quality (and ablation) table of this sweep's runs and their FP references: what the sweep
    measured, on the console, with the same cells and marks as quality.md."""
    from harness.aggregate.cli import load_frame, make_tables
    from harness.aggregate.console import print_table

    try:
        _, frame, evidence = load_frame(store)
        tables = make_tables(sweep_rows(frame, run_ids), evidence, kinds=SWEEP_TABLES)
    except Exception as err:  # noqa: BLE001 - a console table never hides the runs' results or exit code
        log.warning("could not print the sweep's tables from %s: %s", store, err)
        return
    for table in tables.values():
        print(flush=True)
        print_table(table)


class AggregateTables(Callback):
    """After a sweep: regenerate the paper-style tables from the store (next to it: results/store ->
    results/tables), then the summary and the exit code. A table failure never hides the runs'
    results (they are in the store) and never masks a failed run's exit code."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        ledger_path(config.hydra).unlink(missing_ok=True)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report_and_exit(ledger_path(config.hydra))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ledger_path(config.hydra).unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from harness.aggregate.cli import STAMP_FILE, aggregate

        store = Path(config.paths.store)
        out = store.parent / "tables"
        try:
            written = aggregate(store, out, skip_unchanged=True)
            if not written and (out / STAMP_FILE).is_file():
                print(f"tables: {out} (up to date: the store has not changed since they were written)", flush=True)
        except Exception as err:  # noqa: BLE001 - tables are a convenience, the store is the result
            log.warning("could not regenerate tables from %s: %s", store, err)
            written = []
        for path in written:
            print(f"table: {path}", flush=True)
        _report_and_exit(ledger_path(config.hydra), store)
