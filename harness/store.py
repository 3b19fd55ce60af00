"""The results store: one schema-versioned JSON record per run, written atomically.

The store is the single source of truth for results: W&B is a sink fed from a record that is
already on disk, and the tables are rebuilt from the store alone. Files live at
`<root>/<run_id>.json`; a write goes to a unique temp file in the same folder and is renamed over
the target, so readers never see half a record even when several processes write the same run.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

SCHEMA_VERSION = 1
KINDS = ("quality", "latency")
STATUSES = ("finished", "failed", "running")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    trajectory_error, per_block {...}). Non-finite metric values are kept (Python's json writes
    NaN/Infinity) because a diverged run is a result too.
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

    def __post_init__(self) -> None:
        check_run_id(self.run_id)
        if self.kind not in KINDS:
            raise ValueError(f"<kind={self.kind!r}> is not a record kind; accepted: {', '.join(KINDS)}")
        if self.status not in STATUSES:
            raise ValueError(f"<status={self.status!r}> is not a run status; accepted: {', '.join(STATUSES)}")
        for name in ("metrics", "curves", "report", "config", "environment", "artifacts"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"<{name}> must be a dict, got {type(getattr(self, name)).__name__}")
        clash = sorted(set(self.metrics) & _FIELD_NAMES)
        if clash:
            raise ValueError(f"metric keys {clash} collide with record fields (both become table columns)")
        self.metrics = {k: _as_float(k, v) for k, v in self.metrics.items()}

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of to_dict; refuses records of another schema version rather than misread them."""
        data = dict(data)
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


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"<metrics.{key}={value!r}> must be a number (int or float)")
    return float(value)


class ResultsStore:
    """A folder of `<run_id>.json` records; safe for concurrent writers (atomic replace)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

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
        """Write atomically: unique temp file in the same folder, fsync, then os.replace."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(record.run_id)
        text = json.dumps(record.to_dict(), indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{record.run_id}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def records(self) -> list[RunRecord]:
        """All readable records, oldest first; unreadable files are skipped with a warning."""
        if not self.root.is_dir():
            return []
        found = (self._read(p) for p in sorted(self.root.glob("*.json")) if not p.name.startswith("."))
        return sorted((r for r in found if r is not None), key=lambda r: (r.created, r.run_id))

    def to_dataframe(self) -> pd.DataFrame:
        return records_to_dataframe(self.records())

    def _read(self, path: Path) -> RunRecord | None:
        try:
            return RunRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            warnings.warn(f"skipping unreadable run record {path}: {err}", stacklevel=2)
            return None


SCALAR_COLUMNS = ("run_id", "kind", "created", "status", "model", "method", "variant", "bits",
                  "backend", "sampler", "seed", "error")


def records_to_dataframe(records: list[RunRecord]) -> pd.DataFrame:
    """One row per record: the scalar fields, then every metric as its own float column."""
    metric_cols = sorted({key for r in records for key in r.metrics})
    rows = [{**{c: getattr(r, c) for c in SCALAR_COLUMNS}, **r.metrics} for r in records]
    frame = pd.DataFrame(rows, columns=[*SCALAR_COLUMNS, *metric_cols])
    return frame.astype({"seed": "Int64", **{c: "float64" for c in metric_cols}})
