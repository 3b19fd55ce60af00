"""One run, end to end. Read this first: it is the table of contents of the harness.

model -> calibration data -> method quantizes -> backend prepares -> sample -> metrics -> record ->
sinks. `run(cfg)` works with or without Hydra; a run that raises is recorded as failed and the
sweep goes on; a finished run is skipped (resume) unless `force=true`.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from harness.artifacts import ArtifactCache
from harness.backends import BACKENDS
from harness.config import RunConfig
from harness.environment import collect_environment
from harness.evaluate import evaluate, save_grid
from harness.models.zoo import check_model_config, load_model, weights_fingerprint
from harness.references import References
from harness.run_id import run_id
from harness.sampling import sample, schedule_timesteps
from harness.store import ResultsStore, RunRecord
from harness.tracking import make_sink
from methods.engine.modules import QuantSpec

log = logging.getLogger("harness")


def identity_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The config that defines a run's identity: an FP run does not depend on `bits`; every run
    depends on the content of the weights (retrained or replaced weights never resume old records)."""
    ident = {k: v for k, v in raw.items() if k != "fp_reference"}
    ident["model"] = {**raw["model"], "weights_sha256": weights_fingerprint(raw["model"])}
    if raw["method"].get("name") == "fp":
        ident["bits"] = {"weight_bits": 32, "act_bits": 32}
        ident["method"] = {"name": "fp"}
        ident.pop("recipe", None)
        ident.pop("calibration", None)
        ident.pop("seed", None)
    return ident


def validate(cfg: DictConfig | Mapping) -> tuple[RunConfig, dict[str, Any]]:
    """Parse and check every group before anything is loaded."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    rc = RunConfig.parse(raw)
    check_model_config(rc.model)
    methods.METHODS.get(str(rc.method.get("name")))
    BACKENDS.get(str(rc.backend.get("name")))
    return rc, raw


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: DictConfig | Mapping, group: str | None = None) -> RunRecord:
    """Run one configuration (or resume it from the store) and return its record.

    An invalid config raises (after a failed record is written, so a sweep's store shows it); a
    run that fails while running is recorded as failed and returned, so the sweep goes on."""
    try:
        rc, raw = validate(cfg)
    except (ValueError, KeyError) as err:
        _record_invalid(cfg, err)
        raise
    rid = run_id(identity_config(raw))
    sink = make_sink(rc.logger, group=group)  # a bad logger config fails here, before any work
    store = ResultsStore(Path(rc.paths["store"]))
    label = f"{rc.model['name']}/{rc.method['name']}/{rc.bits_tag}/{rc.backend['name']}"
    if not rc.force and store.is_finished(rid):
        log.info("%s: finished record %s in %s; skipping (force=true reruns)", label, rid, store.root)
        return store.get(rid)
    variant = rc.method.get("variant")
    if variant == methods.METHODS.get(rc.method["name"]).full_variant:
        variant = None
    record = RunRecord(
        run_id=rid, model=rc.model["name"], method=rc.method["name"], variant=variant,
        bits=rc.bits_tag, backend=rc.backend["name"], sampler=rc.sampler.name, seed=rc.seed,
        config=raw, environment=collect_environment(), status="running",
    )
    out_dir = Path(rc.paths["outputs"]) / rid
    start = time.perf_counter()
    try:
        execute(rc, record, out_dir)
        record.status = "finished"
        record.report["timings"]["run_total"] = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        log.exception("%s failed", label)
        record.status, record.error, record.traceback = "failed", f"{type(err).__name__}: {err}", traceback.format_exc()
    store.write(record)
    try:
        sink.log_record(record)
    finally:
        sink.finish()
    log.info("%s: %s -> record %s | grid %s | W&B %s", label, record.status, store.path(rid),
             record.artifacts.get("grid", "-"), record.artifacts.get("wandb", getattr(sink, "location", "-")))
    if raw.get("fp_reference", True) and not rc.is_fp:
        run(fp_reference_config(raw), group=group)
    return record


def _record_invalid(cfg: DictConfig | Mapping, err: Exception) -> None:
    """Best effort: a config that does not validate still leaves a failed record behind."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    store_dir = (raw.get("paths") or {}).get("store")
    if not store_dir:
        return
    bits = raw.get("bits") or {}
    record = RunRecord(
        run_id=run_id(raw), model=str((raw.get("model") or {}).get("name")),
        method=str((raw.get("method") or {}).get("name")),
        bits=f"w{bits.get('weight_bits')}a{bits.get('act_bits')}", status="failed",
        error=f"invalid config: {type(err).__name__}: {err}", traceback=traceback.format_exc(), config=raw,
    )
    ResultsStore(Path(store_dir)).write(record)


def fp_reference_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The FP run of the same model, sampler, eval and backend: the first row of every table.
    Its samples are already in the artifact cache, so it costs only metrics and latency."""
    return {**raw, "method": {"name": "fp", "keep_fp": []}, "force": False}


class Phases:
    """Wall time of each pipeline step, announced as it starts; recorded in `report["timings"]` so
    benchmarks can separate harness overhead from denoiser, method and metric work."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str, message: str, *args: Any) -> Iterator[None]:
        log.info(message, *args)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def quant_spec(rc: RunConfig) -> QuantSpec | None:
    """The bit-widths and range inits a run quantizes with; None for the FP method (A32 = no act quant)."""
    if rc.is_fp:
        return None
    return QuantSpec(rc.bits.weight_bits, None if rc.bits.act_bits == 32 else rc.bits.act_bits,
                     weight_init=rc.method.get("weight_init", "minmax"), act_init=rc.method.get("act_init", "minmax"))


def execute(rc: RunConfig, record: RunRecord, out_dir: Path) -> None:
    """The pipeline of one run; fills `record` in place."""
    torch.manual_seed(rc.seed)
    phase, e = Phases(), rc.eval
    with phase("load", "Loading model <%s>", rc.model["name"]):
        model = load_model(rc.model)
        model.net.to(resolve_device(rc.device)).eval()
        refs = References(rc, model, ArtifactCache(rc.paths["artifacts"]))
    spec = quant_spec(rc)
    method = methods.METHODS.get(rc.method["name"])(rc.method, rc.recipe)
    calib = None
    with phase("calibration_data", "Calibration data (shared artifact)"):
        if spec is not None:  # as many FP trajectories as the recipe draws rows at one step
            need = method.calibration_rows_per_step(schedule_timesteps(model, rc.sampler),
                                                    int(model.scheduler_config.get("num_train_timesteps", 1000)))
            calib = refs.calibration(need)
            record.report["calibration_data"] = {"trajectories": refs.calibration_trajectories(need),
                                                 "rows": len(calib), "rows_per_step_requested": need}
    with phase("quantize", "Quantizing with <%s> (%s, recipe=%s)", rc.method["name"], rc.bits_tag, rc.recipe):
        result = method.quantize(model, calib, spec)
    with phase("backend", "Preparing backend <%s>", rc.backend["name"]):
        backend = BACKENDS.get(rc.backend["name"])(rc.backend)
        exe = backend.prepare(result.model, spec)
    with phase("fp_reference", "FP reference samples (shared artifact)"):
        fp_samples = refs.fp_samples()
    with phase("sampling", "Sampling %d images", e.n_samples):
        if spec is None and rc.backend["name"] == "fake":
            samples = fp_samples  # the FP model on the reference backend *is* the shared FP artifact
        else:
            samples = sample(exe, rc.sampler, e.n_samples, e.batch_size, e.seed, n_trajectory=e.n_trajectory,
                             desc=f"sampling {rc.method['name']} {rc.bits_tag}")
    with phase("metrics", "Metrics"):
        record.metrics, record.curves = evaluate(rc, refs, result.model, exe, samples, fp_samples)
    record.metrics["calib_seconds"] = result.report.calib_seconds
    cache = result.report.details.get("cache")
    if isinstance(cache, dict) and "cache_bytes" in cache:  # TFMQ's cached temporal features
        record.metrics["cache_bytes"] = cache["cache_bytes"]
    with phase("grid", "Saving the sample grid"):
        record.artifacts["grid"] = str(save_grid(samples.images[: e.grid], out_dir / "grid.png"))
    record.report = {**record.report, **result.report.__dict__, "backend": backend.describe(),
                     "timings": phase.seconds}
