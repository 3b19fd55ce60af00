"""Push the finished records of a results store that never reached W&B, as offline W&B runs.

    python -m harness.wandb_sync --store results/store [--project diffptq] [--mode offline] [--dir .]
    wandb sync ./wandb/offline-run-*        # uploads them later, from a machine with credentials

A record reached W&B when it ran with the live sink (its `artifacts["wandb"]` names the W&B run) or
when this command pushed it before. The store is only read (records are sealed by their checksum,
and the committed reference store must stay as it is), so pushed records are listed in an
append-only index beside the W&B runs, `<dir>/wandb/diffptq-synced.jsonl` (run id, checksum, W&B
run folder): a second call pushes nothing, a record rerun since (a new checksum) is pushed again.
Each pushed run gets the same content as a live run's end (summary, curves, tables, grids, the
record as an artifact) and the per-block reconstruction losses from the method report.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from harness.store import CHECKSUM_KEY, ResultsStore, RunRecord
from harness.tracking import WandbSink

log = logging.getLogger(__name__)

INDEX_FILE = "diffptq-synced.jsonl"
SAME_SETTING = ("model", "sampler", "eval", "backend")  # what the FP reference shares with a run


def index_path(wandb_dir: str | None) -> Path:
    """Where wandb puts its run folders for `dir` (its own rule: dir, else $WANDB_DIR, else cwd) + the index."""
    return Path(wandb_dir or os.environ.get("WANDB_DIR") or ".") / "wandb" / INDEX_FILE


def synced(index: Path) -> set[tuple[str, str]]:
    """(run id, checksum) of every record pushed before; a torn last line (a killed push) is ignored."""
    if not index.is_file():
        return set()
    done = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
            done.add((entry["run_id"], entry["checksum"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def pending(records: Sequence[RunRecord], done: set[tuple[str, str]]) -> list[tuple[RunRecord, str]]:
    """Finished records not in W&B yet, with their checksums."""
    out = []
    for record in records:
        checksum = record.to_dict()[CHECKSUM_KEY]
        if record.finished and "wandb" not in record.artifacts and (record.run_id, checksum) not in done:
            out.append((record, checksum))
    return out


def fp_grid(record: RunRecord, records: Sequence[RunRecord]) -> str | None:
    """The grid of the record's FP reference (same model, sampler, eval, backend) when it is on disk."""
    if record.method == "fp":
        return None
    for fp in records:
        if (fp.method == "fp" and fp.kind == record.kind and fp.finished
                and all(fp.config.get(k) == record.config.get(k) for k in SAME_SETTING)):
            grid = fp.artifacts.get("grid")
            if grid and Path(grid).is_file():
                return grid
    return None


def sync_store(store: Path, project: str = "diffptq", mode: str = "offline", wandb_dir: str | None = None,
               group: str | None = None, entity: str | None = None) -> tuple[list[str], int]:
    """Push the store's pending records; returns (W&B run folders or URLs pushed, number that failed)."""
    records = ResultsStore(store).records()
    index = index_path(wandb_dir)
    pushed, failed = [], 0
    for record, checksum in pending(records, synced(index)):
        sink = WandbSink(project=project, entity=entity, mode=mode, dir=wandb_dir, group=group,
                         console="off", stats=False)  # nothing runs: no console, no system metrics
        sink.start(record, wandb_id=f"{record.run_id}-{checksum[:8]}", live=False)  # a past run
        sink.log_record(record, fp_grid=fp_grid(record, records))
        if sink.errors or sink.location is None:
            failed += 1
            continue
        index.parent.mkdir(parents=True, exist_ok=True)
        with index.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"run_id": record.run_id, "checksum": checksum, "wandb": sink.location}) + "\n")
        pushed.append(sink.location)
    return pushed, failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.wandb_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="results store folder (only read)")
    parser.add_argument("--project", default="diffptq")
    parser.add_argument("--entity", default=None)
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="offline (default): `wandb sync` uploads later; online: push now")
    parser.add_argument("--dir", default=None, help="W&B folder parent, as logger.dir (default: $WANDB_DIR or .)")
    parser.add_argument("--group", default=None, help="W&B group of the pushed runs")
    args = parser.parse_args(argv)
    if not args.store.is_dir():
        parser.error(f"--store {args.store} is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pushed, failed = sync_store(args.store, args.project, args.mode, args.dir, args.group, args.entity)
    for where in pushed:
        print(where)
    hint = "; upload each folder above with `wandb sync FOLDER`" if pushed and args.mode == "offline" else ""
    print(f"{len(pushed)} record(s) pushed to W&B ({args.mode}), {failed} failed{hint}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
