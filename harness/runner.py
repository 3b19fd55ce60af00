"""One run, end to end. Read this first: it is the table of contents of the harness.

model -> calibration data -> method quantizes -> backend prepares -> sample -> metrics -> record ->
sinks. `run(cfg)` works with or without Hydra; it never raises: a run that fails (at validation, at
its run id, or while running) is recorded as failed and the sweep goes on; a finished run is
skipped (resume) unless `force=true`, and a failed rerun never replaces a finished record.
"""

from __future__ import annotations

import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from harness import distributed
from harness.artifacts import ArtifactCache
from harness.backends import BACKENDS
from harness.callbacks import note_outcome
from harness.config import RunConfig
from harness.environment import collect_environment, machine_load, under_load
from harness.evaluate import evaluate, save_grid
from harness.finite import NonFiniteError
from harness.identity import run_identity
from harness.locks import hold
from harness.metrics.uncertainty import FEATURES_FILE
from harness.models.conditions import bind_prompts
from harness.models.zoo import check_model_config, load_model
from harness.references import References
from harness.run_id import run_id
from harness.sampling import schedule_timesteps
from harness.store import ResultsStore, RunRecord
from harness.tracking import headline, make_sink
from methods.engine.modules import QuantSpec
from methods.settings import check_settings

log = logging.getLogger("harness")


def validate(cfg: DictConfig | Mapping) -> tuple[RunConfig, dict[str, Any]]:
    """Parse and check every group before anything is loaded: the typed config, the model config, the
    device, the method's settings against its schema (and its own cross-key checks), the backend."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    rc = RunConfig.parse(raw)
    check_model_config(rc.model)
    check_device(rc.device)
    method_cls = methods.METHODS.get(str(rc.method.get("name")))
    check_settings(method_cls, rc.method, rc.recipe)
    method_cls(rc.method, rc.recipe)  # recipe choice and cross-key rules (e.g. TFMQ's variant vs toggles)
    BACKENDS.get(str(rc.backend.get("name")))
    return rc, raw


_DEVICE_RE = re.compile(r"^cuda(?::(\d+))?$")


def check_device(name: str) -> None:
    """`cuda` / `cuda:N` must name a GPU this process can see; said up front, not as a driver error mid-run."""
    if name in ("auto", "cpu"):
        return
    m = _DEVICE_RE.match(name)
    if m is None:
        raise ValueError(f"<device={name}> must be auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"<device={name}> but no CUDA GPU is available to this process (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); use device=cpu or device=auto")
    index, count = int(m[1] or 0), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"<device={name}> but only {count} GPU(s) are visible: accepted cuda:0..cuda:{count - 1}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":  # under torchrun: this rank's GPU (LOCAL_RANK)
        return distributed.local_device()
    return torch.device(name)


def check_metrics_finite(metrics: Mapping[str, float]) -> None:
    """A NaN or inf metric fails the run: tables must never show a diverged run as a number."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"non-finite metrics {bad}: the run diverged or a metric failed")


def run(cfg: DictConfig | Mapping, group: str | None = None, ledger: Path | None = None) -> RunRecord:
    """Run one configuration (or resume it from the store) and return its record; never raises.

    Every failure becomes a failed record in the store (an invalid config, an error computing the run
    id, an error while running) and the sweep goes on; a failed run does not launch its FP reference.
    `ledger` (a JSON-lines file) gets one line per run attempted here (finished / failed / resumed),
    from which the Hydra callbacks print the sweep's summary and set the exit code."""
    distributed.init_from_env()  # under torchrun: join the ranks that share this run's evaluation
    ledger = ledger if distributed.is_main() else None  # one ledger line per run, not per rank
    stage = "invalid config"
    try:
        rc, raw = validate(cfg)
        stage = "run id"
        rid = run_id(run_identity(raw))
        stage = "logger"
        sink = make_sink(rc.logger if distributed.is_main() else None, group=group)  # fails here, before any work
    except Exception as err:  # noqa: BLE001 - recorded as failed; the sweep goes on
        log.error("%s: %s: %s", stage, type(err).__name__, err)
        return note_outcome(ledger, _record_invalid(cfg, err, stage), "failed")
    store = distributed.main_writes(ResultsStore(Path(rc.paths["store"])))  # torchrun: rank 0 writes
    label = f"{rc.model['name']}/{rc.method['name']}/{rc.bits_tag}/{rc.backend['name']}"
    stored = None if rc.force else store.get(rid)
    if distributed.from_main(stored is not None and stored.finished):  # all ranks follow rank 0
        log.info("%s: finished record %s in %s; skipping (force=true reruns)", label, rid, store.root)
        return note_outcome(ledger, stored or store.get(rid), "resumed")
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
    sink.start(record)  # live: phases, reconstruction losses, then the results
    if sink.location:
        record.artifacts["wandb"] = sink.location  # it reached W&B: harness.wandb_sync leaves it out
    try:
        store.write(record)  # a marker: a run killed from outside leaves a running record, not nothing
        record.environment["load"] = {"start": machine_load()}
        execute(rc, record, out_dir, on_phase=sink.phase)
        record.environment["load"]["end"] = machine_load()
        record.environment["under_load"] = under_load(record.environment["load"])
        check_metrics_finite(record.metrics)
        record.status = "finished"
        record.report["timings"]["run_total"] = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - a failed run is recorded, the sweep goes on
        log.exception("%s failed", label)
        record.status, record.error, record.traceback = "failed", f"{type(err).__name__}: {err}", traceback.format_exc()
    except BaseException:  # Ctrl-C, SystemExit: the W&B run ends as failed, the interruption goes on
        sink.finish()
        raise
    try:
        store.write(record)
    except Exception as err:  # noqa: BLE001 - e.g. a full disk: say so, the sweep goes on
        log.exception("%s: the record could not be written to %s", label, store.root)
        record.status, record.error = "failed", f"record not written: {type(err).__name__}: {err} (run: {record.error})"
    try:
        sink.log_record(record)
    finally:
        sink.finish()
    log.info("%s", headline(record, store.path(rid), sink.location))
    note_outcome(ledger, record, record.status)
    if raw.get("fp_reference", True) and not rc.is_fp and record.finished:
        fp_raw = fp_reference_config(raw)  # parallel jobs share it: one computes it, the others wait and resume it
        with hold(store.root / ".locks" / f"{run_id(run_identity(fp_raw))}.lock",
                  rc.paths.get("lock_mode", "os"), "the FP reference run"):
            run(fp_raw, group=group, ledger=ledger)
    return record


def _record_invalid(cfg: DictConfig | Mapping, err: Exception, stage: str) -> RunRecord:
    """A config that does not validate (or whose run id cannot be computed) still leaves a failed
    record, under the hash of the raw config, in the store when the config names one."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except Exception:  # noqa: BLE001 - an interpolation error: record what can be shown
        raw = {"unresolved": OmegaConf.to_yaml(cfg) if isinstance(cfg, DictConfig) else repr(cfg)}
    def group(key: str) -> Mapping[str, Any]:
        value = raw.get(key)
        return value if isinstance(value, Mapping) else {}

    bits = group("bits")
    record = RunRecord(
        run_id=run_id(raw), model=str(group("model").get("name")), method=str(group("method").get("name")),
        bits=f"w{bits.get('weight_bits')}a{bits.get('act_bits')}", status="failed",
        error=f"{stage}: {type(err).__name__}: {err}", traceback=traceback.format_exc(), config=raw,
    )
    store_dir = group("paths").get("store")
    if store_dir:
        try:
            ResultsStore(Path(store_dir)).write(record)
        except Exception as write_err:  # noqa: BLE001 - the ledger and the log still say it
            log.error("the failed record could not be written to %s: %s", store_dir, write_err)
    return record


def fp_reference_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The FP run of the same model, sampler, eval and backend: the first row of every table.
    Its samples are already in the artifact cache, so it costs only metrics and latency."""
    return {**raw, "method": {"name": "fp", "keep_fp": []}, "force": False}


class Phases:
    """Wall time of each pipeline step, announced as it starts; recorded in `report["timings"]` so
    benchmarks can separate harness overhead from denoiser, method and metric work."""

    def __init__(self, on_done: Callable[[str, float], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_done = on_done  # e.g. a live W&B run: each step's time as it ends

    @contextmanager
    def __call__(self, name: str, message: str, *args: Any) -> Iterator[None]:
        log.info(message, *args)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self.on_done is not None:
                self.on_done(name, elapsed)


def quant_spec(rc: RunConfig) -> QuantSpec | None:
    """The bit-widths and range inits a run quantizes with; None for the FP method (A32 = no act quant)."""
    if rc.is_fp:
        return None
    return QuantSpec(rc.bits.weight_bits, None if rc.bits.act_bits == 32 else rc.bits.act_bits,
                     weight_init=rc.method.get("weight_init", "minmax"), act_init=rc.method.get("act_init", "minmax"))


def execute(rc: RunConfig, record: RunRecord, out_dir: Path,
            on_phase: Callable[[str, float], None] | None = None) -> None:
    """The pipeline of one run; fills `record` in place; `on_phase(name, seconds)` as each step ends."""
    torch.manual_seed(rc.seed)
    phase, e = Phases(on_phase), rc.eval
    with phase("load", "Loading model <%s>", rc.model["name"]):
        model = load_model(rc.model).to(resolve_device(rc.device))  # denoiser + decoder + text encoder
        cache = ArtifactCache(rc.paths["artifacts"], rc.paths.get("lock_mode", "os"))
        bind_prompts(model.conditions, e.prompts, e.prompt_column, cache)  # text pipelines: encoded once, cached
        refs = References(rc, model, cache)
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
        result = method.quantize(model, calib, spec, footprint_batch=e.batch_size)  # + the model's own bytes
    with phase("backend", "Preparing backend <%s>", rc.backend["name"]):
        backend = BACKENDS.get(rc.backend["name"])(rc.backend)
        exe = backend.prepare(result.model, spec)
    with phase("fp_reference", "FP reference samples (shared artifact)"):
        fp_samples = refs.fp_samples()
    with phase("sampling", "Sampling %d images", e.n_samples):
        if spec is None and rc.backend["name"] == "fake":
            samples = fp_samples  # the FP model on the reference backend *is* the shared FP artifact
        else:
            samples = distributed.sample(exe, rc.sampler, e.n_samples, e.batch_size, e.seed,
                                         n_trajectory=e.n_trajectory,
                                         desc=f"sampling {rc.method['name']} {rc.bits_tag}")
    with phase("metrics", "Metrics"):
        features_dir = out_dir if distributed.is_main() else None  # per-sample features for paired tests
        record.metrics, record.curves = evaluate(rc, refs, result.model, exe, samples, fp_samples, features_dir)
        if features_dir is not None and (features_dir / FEATURES_FILE).is_file():
            record.artifacts["eval_features"] = str(features_dir / FEATURES_FILE)
    record.metrics["calib_seconds"] = result.report.calib_seconds
    record.metrics.update(result.report.footprint)  # weights at their bit-width, activation peak: not the process RSS
    cache = result.report.details.get("cache")
    if isinstance(cache, dict) and "cache_bytes" in cache:  # TFMQ's cached temporal features
        record.metrics["cache_bytes"] = cache["cache_bytes"]
    rounding = result.report.details.get("adaround")  # AdaRound variables undecided before hard rounding
    if isinstance(rounding, dict) and "soft_fraction" in rounding:
        record.metrics["adaround_soft_fraction"] = rounding["soft_fraction"]
    with phase("grid", "Saving the sample grid"):
        if distributed.is_main():
            record.artifacts["grid"] = str(save_grid(samples.images[: e.grid], out_dir / "grid.png"))
            if spec is not None:  # the FP samples of the same seeds, for side-by-side views (W&B)
                record.artifacts["fp_grid"] = str(save_grid(fp_samples.images[: e.grid], out_dir / "fp_grid.png"))
    record.report = {**record.report, **result.report.__dict__, "backend": backend.describe(),
                     "timings": phase.seconds, "artifact_builds": refs.cache.builds, "model": model.describe()}
