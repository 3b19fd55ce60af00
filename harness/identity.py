"""What a run is: the config that defines its identity, its run id, and its finished record if any.

Computed without torch or diffusers (the weights' and prompts' content hashes read files only), so a
sweep that resumes finished runs never imports the engine: run.py asks `finished_record` first and
loads harness.runner only for a run that has work to do.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from harness.atomic import file_sha256
from harness.models.layout import weights_fingerprint
from harness.run_id import run_id
from harness.store import ResultsStore, RunRecord

log = logging.getLogger("harness")


def prompts_fingerprint(path: str | Path) -> str:
    """Content hash of a prompt file for run identities (an edited file is a new run); cheap to recompute."""
    path = Path(path).expanduser()
    return file_sha256(path)[:16] if path.is_file() else f"missing:{path}"  # loading fails later, explained


def run_identity(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config that defines a run's identity: an FP run does not depend on `bits`; every run
    depends on the content of the weights (retrained or replaced weights never resume old records)."""
    ident = {k: v for k, v in raw.items() if k != "fp_reference"}
    ident["model"] = {**raw["model"], "weights_sha256": weights_fingerprint(raw["model"])}
    if (raw.get("eval") or {}).get("prompts"):  # the prompts' content, not only their path
        ident["eval"] = {**raw["eval"], "prompts_sha256": prompts_fingerprint(raw["eval"]["prompts"])}
    if raw["method"].get("name") == "fp":
        ident["bits"] = {"weight_bits": 32, "act_bits": 32}
        ident["method"] = {"name": "fp"}
        ident.pop("recipe", None)
        ident.pop("calibration", None)
        ident.pop("seed", None)
    return ident


def finished_record(cfg: DictConfig | Mapping) -> RunRecord | None:
    """The store's finished record of exactly this config, or None (also for force=true, and for a
    config that cannot even be hashed: the runner then validates it and records why it failed)."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        if raw.get("force"):
            return None
        rid = run_id(run_identity(raw))
        stored = ResultsStore(Path(raw["paths"]["store"])).get(rid)
    except Exception:  # noqa: BLE001 - not resumable here; the runner explains any real problem
        return None
    if stored is None or not stored.finished:
        return None
    log.info("%s/%s/%s/%s: finished record %s in %s; skipping (force=true reruns)", stored.model, stored.method,
             stored.bits, stored.backend, rid, raw["paths"]["store"])
    return stored
