"""The results store: one schema-versioned JSON record per run, written atomically.

The store is the single source of truth for results: W&B is a sink fed from a record that is
already on disk, and the tables are rebuilt from the store alone. Files live at
`<root>/<run_id>.json`; a write goes to a unique temp file in the same folder and is renamed over
the target, so readers never see half a record even when several processes write the same run.

Nothing is lost and nothing is faked: a record carries a sha256 of its own canonical JSON, so an
edited or corrupted file is reported (and never tabulated); a finished record is never replaced by a
failed or interrupted rerun, whose failure is kept in the record's `attempts` instead; temp files left
by killed writers are removed when the store is opened. `python -m harness.store verify` checks a
store and its artifact cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.atomic import file_sha256, make_shareable, remove_stale_tmp, stale_tmp_files, stale_tmp_seconds

if TYPE_CHECKING:
    import pandas as pd

SCHEMA_VERSION = 1
KINDS = ("quality", "latency")
STATUSES = ("finished", "failed", "running")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CHECKSUM_KEY = "checksum"


def check_run_id(run_id: str) -> str:
    """Run ids name files, so they must not contain path separators or start with a dot."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"<run_id={run_id!r}> must be letters, digits, '_', '.', '-' and not start with '.'")
    return run_id


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunRecord:
    """Everything one run produced and the facts needed to reproduce and compare it.

    `metrics` holds scalars only (fid, sfid, is, kid, psnr, calib_seconds, latency_ms,
    weight_bytes, ...); per-timestep series go to `curves` (timesteps, temporal_feature_error,
    trajectory_error, per_block {...}). The runner never marks a record with a non-finite metric
    finished (a diverged run fails); json still round-trips NaN/Infinity so old records stay readable.
    `attempts` keeps the failed or interrupted reruns of a finished record (created, status, error).
    """

    run_id: str
    model: str
    method: str
    bits: str
    kind: str = "quality"
    created: str = field(default_factory=utc_now)
    status: str = "running"
    error: str | None = None
    traceback: str | None = None
    variant: str | None = None
    backend: str | None = None
    sampler: str | None = None
    seed: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.kind not in KINDS:
            raise ValueError(f"<kind={self.kind!r}> is not a record kind; accepted: {', '.join(KINDS)}")
        if self.status not in STATUSES:
            raise ValueError(f"<status={self.status!r}> is not a run status; accepted: {', '.join(STATUSES)}")
        for name in ("metrics", "curves", "report", "config", "environment", "artifacts"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"<{name}> must be a dict, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.attempts, list) or not all(isinstance(a, dict) for a in self.attempts):
            raise ValueError("<attempts> must be a list of dicts")
        clash = sorted(set(self.metrics) & _FIELD_NAMES)
        if clash:
            raise ValueError(f"metric keys {clash} collide with record fields (both become table columns)")
        self.metrics = {k: _as_float(k, v) for k, v in self.metrics.items()}

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, sealed with the checksum of everything else in it."""
        data = {"schema_version": SCHEMA_VERSION, **asdict(self)}
        data[CHECKSUM_KEY] = record_checksum(data)
        return data

    def attempt(self) -> dict[str, Any]:
        """This record as one entry of another record's attempt history."""
        return {"created": self.created, "status": self.status, "error": self.error, "traceback": self.traceback}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of to_dict; refuses records of another schema version rather than misread them, and
        records whose checksum does not match (CorruptRecordError). Records written before checksums
        existed have none and are accepted (`verify` lists them as unsealed)."""
        data = dict(data)
        stored = data.pop(CHECKSUM_KEY, None)
        if stored is not None and stored != record_checksum(data):
            raise CorruptRecordError("checksum mismatch: the record was edited or corrupted after it was written")
        version = data.pop("schema_version", None)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"run record schema_version={version!r} is not supported by this code; accepted: "
                f"{SCHEMA_VERSION} (a newer harness wrote it, or the file is not a run record)"
            )
        unknown = sorted(set(data) - _FIELD_NAMES)
        if unknown:
            raise ValueError(f"run record has unknown fields {unknown}; accepted: {sorted(_FIELD_NAMES)}")
        return cls(**data)


_FIELD_NAMES = frozenset(f.name for f in fields(RunRecord))


def record_checksum(data: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON (sorted keys, no whitespace) without the checksum itself.

    The body goes through JSON once first, so the writer hashes what a reader will parse: a dict
    with int keys (e.g. per-timestep counts) sorts 2 < 10 as ints but "10" < "2" once written."""
    body = json.loads(json.dumps({k: v for k, v in data.items() if k != CHECKSUM_KEY}))
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CorruptRecordError(ValueError):
    """A record file whose checksum does not match its content: edited by hand or damaged."""


def parse_record(text: str) -> RunRecord:
    """A record from its file text (see RunRecord.from_dict)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a run record is a JSON object, got {type(data).__name__}")
    return RunRecord.from_dict(data)


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"<metrics.{key}={value!r}> must be a number (int or float)")
    return float(value)


class ResultsStore:
    """A folder of `<run_id>.json` records; safe for concurrent writers (atomic replace).

    Opening a store removes temp files older than `stale_tmp_after` seconds (default
    $HARNESS_STALE_TMP_SECONDS or 1 h): they are left by writers that were killed mid-write."""

    def __init__(self, root: str | os.PathLike[str], stale_tmp_after: float | None = None) -> None:
        self.root = Path(root)
        remove_stale_tmp(self.root, stale_tmp_after)

    def path(self, run_id: str) -> Path:
        return self.root / f"{check_run_id(run_id)}.json"

    def get(self, run_id: str) -> RunRecord | None:
        """The stored record, or None when absent or unreadable (a warning says why)."""
        path = self.path(run_id)
        return self._read(path) if path.exists() else None

    def is_finished(self, run_id: str) -> bool:
        record = self.get(run_id)
        return record is not None and record.finished

    def write(self, record: RunRecord) -> Path:
        """Store `record`, never losing a finished result.

        A failed or running record does not replace a finished one: a failure is appended to the
        finished record's `attempts`, a running marker is dropped. Any other record inherits the
        attempt history of what it replaces, plus that record itself when it failed or is the running
        marker of another attempt (a run killed before it finished). A file that does not parse or fails its checksum is
        kept beside the new record as `<run_id>.json.corrupt-<time>` rather than overwritten."""
        target = self.path(record.run_id)
        previous: RunRecord | None = None
        if target.exists():
            try:
                previous = parse_record(target.read_text(encoding="utf-8"))
            except FileNotFoundError:
                previous = None
            except (OSError, ValueError, TypeError) as err:
                aside = target.with_name(f"{target.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
                try:
                    os.replace(target, aside)
                    warnings.warn(f"run record {target} was unreadable ({err}); kept as {aside.name}", stacklevel=2)
                except FileNotFoundError:  # a concurrent writer set it aside first
                    pass
        if previous is not None and previous.finished and not record.finished:
            if record.status == "running":
                return target
            kept = replace(previous, attempts=[*previous.attempts, record.attempt()])
            self._write_file(target, kept)
            warnings.warn(f"run {record.run_id} failed ({record.error}); the finished record is kept and the "
                          "failure added to its attempts", stacklevel=2)
            return target
        if previous is not None:  # an earlier failure, or the marker of a run killed before it finished
            earlier = previous.status == "failed" or (previous.status == "running"
                                                      and previous.created != record.created)
            history = [*previous.attempts, *([previous.attempt()] if earlier else [])]
            record = replace(record, attempts=[*history, *record.attempts])
        self._write_file(target, record)
        return target

    def _write_file(self, target: Path, record: RunRecord) -> None:
        """Atomic write: unique temp file in the same folder, fsync, group-readable mode, os.replace."""
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record.to_dict(), indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{record.run_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            make_shareable(tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def records(self) -> list[RunRecord]:
        """All readable records, oldest first; unreadable or corrupted files are skipped with a warning."""
        if not self.root.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.root.glob("*.json")) if not p.name.startswith("."))
        return sorted((r for r in found if r is not None), key=lambda r: (r.created, r.run_id))

    def to_dataframe(self) -> pd.DataFrame:
        return records_to_dataframe(self.records())

    def _read(self, path: Path) -> RunRecord | None:
        try:
            return parse_record(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError) as err:
            warnings.warn(f"skipping unreadable run record {path}: {err}", stacklevel=2)
            return None


SCALAR_COLUMNS = ("run_id", "kind", "created", "status", "model", "method", "variant", "bits",
                  "backend", "sampler", "seed", "error")


def records_to_dataframe(records: list[RunRecord]) -> pd.DataFrame:
    """One row per record: the scalar fields, then every metric as its own float column."""
    metric_cols = sorted({key for r in records for key in r.metrics})
    rows = [{**{c: getattr(r, c) for c in SCALAR_COLUMNS}, **r.metrics} for r in records]
    import pandas as pd  # the tables' dependency; resuming a run reads records without it

    frame = pd.DataFrame(rows, columns=[*SCALAR_COLUMNS, *metric_cols])
    return frame.astype({"seed": "Int64", **{c: "float64" for c in metric_cols}})


@dataclass
class Finding:
    """One line of `verify`: a problem fails the check, a note does not."""

    path: Path
    what: str
    problem: bool = True

    def __str__(self) -> str:
        return f"{'PROBLEM' if self.problem else 'note'}: {self.path}: {self.what}"


def verify_store(root: Path, stale_after: float) -> tuple[list[Finding], dict[str, int]]:
    """Check every record file: parses, current schema, checksum; temp files and interrupted runs."""
    findings: list[Finding] = []
    counts = {"finished": 0, "failed": 0, "running": 0}
    if not root.is_dir():
        return [Finding(root, "store folder does not exist")], counts
    for path in sorted(p for p in root.glob("*.json") if not p.name.startswith(".")):
        try:
            text = path.read_text(encoding="utf-8")
            record = parse_record(text)
        except (OSError, ValueError, TypeError) as err:
            findings.append(Finding(path, f"unreadable or corrupted: {err}"))
            continue
        counts[record.status] += 1
        if json.loads(text).get(CHECKSUM_KEY) is None:
            findings.append(Finding(path, "no checksum (written before records were sealed); cannot be verified",
                                    problem=False))
        if record.status == "running":
            findings.append(Finding(path, f"status running since {record.created}: an interrupted run, or one "
                                          "still running", problem=False))
        if record.finished and not all(map(math.isfinite, record.metrics.values())):
            bad = sorted(k for k, v in record.metrics.items() if not math.isfinite(v))
            findings.append(Finding(path, f"finished record with non-finite metrics {bad}"))
    findings += [Finding(p, "corrupted record set aside by a later write", problem=False)
                 for p in sorted(root.glob("*.json.corrupt-*"))]
    findings += [Finding(p, f"temp file older than {stale_after:.0f} s left by an interrupted writer")
                 for p in stale_tmp_files(root, stale_after)]
    return findings, counts


def verify_artifacts(root: Path, stale_after: float) -> tuple[list[Finding], int]:
    """Check every cached artifact against the sha256 in its sidecar; sidecars without data files."""
    findings: list[Finding] = []
    checked = 0
    if not root.is_dir():
        return [Finding(root, "artifact folder does not exist")], 0
    for data in sorted(root.rglob("*.safetensors")):
        sidecar = data.with_suffix(".json")
        checked += 1
        try:
            expected = json.loads(sidecar.read_text()).get("sha256")
        except (OSError, ValueError, AttributeError) as err:
            findings.append(Finding(data, f"sidecar {sidecar.name} missing or unreadable ({err})"))
            continue
        if expected != file_sha256(data):
            findings.append(Finding(data, "sha256 does not match its sidecar (truncated or corrupted; the next "
                                          "run that needs it rebuilds it)"))
    findings += [Finding(s, "sidecar without its data file") for s in sorted(root.rglob("*.json"))
                 if not s.name.startswith(".") and not s.with_suffix(".safetensors").exists()]
    findings += [Finding(p, f"temp file older than {stale_after:.0f} s left by an interrupted writer")
                 for p in stale_tmp_files(root, stale_after, recursive=True)]
    return findings, checked


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m harness.store verify`: exit 0 when the store and artifacts hold no problem, else 1."""
    p = argparse.ArgumentParser(prog="python -m harness.store", description="Check a results store and its artifacts.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check record checksums, artifact hashes and leftover temp files")
    v.add_argument("--store", type=Path, default=Path("results/store"), help="results store folder")
    v.add_argument("--artifacts", type=Path, help="artifact cache folder (e.g. .cache/artifacts); skipped if unset")
    v.add_argument("--stale-after", type=float, default=None,
                   help="age in seconds from which a temp file counts as left behind "
                        "(default $HARNESS_STALE_TMP_SECONDS or 3600)")
    args = p.parse_args(argv)
    stale_after = stale_tmp_seconds() if args.stale_after is None else args.stale_after
    findings, counts = verify_store(args.store, stale_after)  # a verifier reads; it never cleans up
    summary = f"{sum(counts.values())} records ({', '.join(f'{n} {s}' for s, n in counts.items())})"
    if args.artifacts is not None:
        more, checked = verify_artifacts(args.artifacts, stale_after)
        findings += more
        summary += f", {checked} artifacts"
    for finding in findings:
        print(finding)
    problems = sum(f.problem for f in findings)
    print(f"{summary}: {problems} problem(s), {len(findings) - problems} note(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
