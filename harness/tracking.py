"""Sinks that follow a run while it runs: Weights & Biases, or nothing.

Lifecycle (harness/runner.py): `start(record)` once the run id is known, before the model loads;
`phase(name, seconds)` as each pipeline step ends; engine events (methods/engine/events.py: block
reconstruction losses) while the method quantizes; `log_record(record)` once the finished or failed
record is in the results store; `finish()` always, also when an exception escapes the run. A run
that did not log a finished record ends as failed in W&B (exit code 1).

The record is written to the results store before the sink sees the result, so a sink can never
lose it; W&B errors are logged as warnings and never fail the run. W&B runs offline unless the user
has credentials (WANDB_API_KEY, or a netrc entry for the W&B host) or the config asks for
`mode: online`, so a sweep never waits on the network; `wandb sync <dir>` uploads later. When the
server cannot be reached, `wandb.init` gives up after `init_timeout` seconds (W&B's own default is
90 s) and the run is logged offline instead, with a warning; the rest of the process's runs go
offline at once rather than each waiting again.

In the W&B workspace: per-timestep curves are history rows with `timestep` as their step metric
(`curves/<name>`, per-block series as `curves/<name>/<block>`), so runs overlay and seeds group;
live reconstruction losses are `recon/loss_<weights|acts>` over `recon/step` and per block
`block/<weights|acts>/loss_before|after` over `block/index`; phase times are `timings/<phase>`;
metrics (`metrics/<key>`) and timings are in the summary; `tables/*` are per-block errors and the
curves; `samples/grid` and `samples/fp_vs_quantized` the grids; the record and its tables are the
run's `record-<run_id>` artifact.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from harness.aggregate.metric_info import metric_info
from harness.store import RunRecord

if TYPE_CHECKING:  # harness.wandb_sync needs neither torch nor the methods package
    import torch

log = logging.getLogger(__name__)

MODES = ("auto", "offline", "online", "disabled")
CONSOLE = ("off", "wrap", "redirect", "auto")
DEFAULT_WANDB_HOST = "https://api.wandb.ai"
RECORD_FILE = "run_record.json"
DEFAULT_INIT_TIMEOUT = 30.0
_unreachable: set[str] = set()  # W&B hosts that timed out in this process: later runs go offline at once


class Sink(Protocol):
    """Where a run is mirrored while it runs; `location` says where it went (dir or URL)."""

    location: str | None

    def start(self, record: RunRecord) -> None: ...

    def phase(self, name: str, seconds: float) -> None: ...

    def log_record(self, record: RunRecord, images: torch.Tensor | None = None) -> None: ...

    def finish(self) -> None: ...


class NullSink:
    """`logger=none`: the store alone keeps the result."""

    location: str | None = None

    def start(self, record: RunRecord) -> None:
        return None

    def phase(self, name: str, seconds: float) -> None:
        return None

    def log_record(self, record: RunRecord, images: torch.Tensor | None = None) -> None:
        return None

    def finish(self) -> None:
        return None


def has_wandb_credentials() -> bool:
    """True when W&B would authenticate without a prompt: an API key in the env or in netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        entry = netrc.netrc(str(path)).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str) -> str:
    """auto -> $WANDB_MODE if set, else online with credentials, else offline."""
    if mode not in MODES:
        raise ValueError(f"<logger.mode={mode}> is not a W&B mode; accepted: {', '.join(MODES)}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "")
    env = {"dryrun": "offline", "run": "online"}.get(env, env)  # wandb's legacy aliases
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if has_wandb_credentials() else "offline"


def run_name(record: RunRecord) -> str:
    """Readable W&B name, e.g. ddpm_mnist/tfmq/w4a8/fake (ablations: tfmq:no_fsc)."""
    method = f"{record.method}:{record.variant}" if record.variant else record.method
    return "/".join(str(p) for p in (record.model, method, record.bits, record.backend) if p)


def run_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config as it runs: the method's keys with its selected recipe merged over them, as
    methods/base.py does; W&B would otherwise show every recipe's iteration counts side by side."""
    cfg = dict(config)
    method = cfg.get("method")
    if isinstance(method, Mapping) and isinstance(method.get("recipes"), Mapping):
        chosen = method["recipes"].get(cfg.get("recipe"), {})
        cfg["method"] = {**{k: v for k, v in method.items() if k != "recipes"}, **chosen}
    return cfg


def curve_rows(curves: Mapping[str, Any]) -> list[dict[str, float]]:
    """One history row per timestep (ascending), each series aligned with `timesteps` as a key;
    nested series (per block) become `curves/<name>/<block>`. Misaligned series are left out."""
    steps = list(curves.get("timesteps") or [])
    series: dict[str, Sequence[float]] = {}
    for key, values in curves.items():
        if key == "timesteps":
            continue
        flat = ({f"curves/{key}/{name}": v for name, v in values.items()} if isinstance(values, Mapping)
                else {f"curves/{key}": values})
        for name, v in flat.items():
            if isinstance(v, Sequence) and steps and len(v) == len(steps):
                series[name] = v
            else:
                log.warning("W&B: curve %r is not aligned with %d timesteps; not logged", name, len(steps))
    order = sorted(range(len(steps)), key=lambda i: steps[i])
    return [{"timestep": steps[i], **{k: float(v[i]) for k, v in series.items()}} for i in order] if series else []


def block_errors(report: Mapping[str, Any]) -> list[list[Any]]:
    """Rows (stage, block, phase, loss_before, loss_after, iters, seconds) of every reconstruction in a
    method report: `details[stage]["blocks"]` (BRECQ-style block passes) and `details[stage]` itself
    when it has losses (TFMQ's TIAR)."""
    rows: list[list[Any]] = []
    details = report.get("details") if isinstance(report.get("details"), Mapping) else {}
    for stage, value in details.items():
        if not isinstance(value, Mapping):
            continue
        blocks = value.get("blocks") if isinstance(value.get("blocks"), Mapping) else {stage: value}
        for block, s in blocks.items():
            if isinstance(s, Mapping) and "loss_before" in s and "loss_after" in s:
                phase = "weights" if s.get("layers", s.get("rounding_vars")) else "acts"
                rows.append([stage, block, phase, s["loss_before"], s["loss_after"], s.get("iters"), s.get("seconds")])
    return rows


BLOCK_COLUMNS = ["stage", "block", "phase", "loss_before", "loss_after", "iters", "seconds"]


def curve_block_errors(curves: Mapping[str, Any]) -> list[list[Any]]:
    """Rows (curve, block, mean, max) of the per-block per-timestep curves (temporal feature error)."""
    rows = []
    for key, values in curves.items():
        if isinstance(values, Mapping):
            for block, v in values.items():
                finite = [float(x) for x in v if math.isfinite(float(x))] if isinstance(v, Sequence) else []
                if finite:
                    rows.append([key, block, sum(finite) / len(finite), max(finite)])
    return rows


def _tables(record: RunRecord, curves: list[dict[str, float]]) -> dict[str, Any]:
    """The record's W&B Tables (`curves`: its curve_rows); fresh objects on each call, as a Table
    goes to one place only."""
    import wandb

    tables = {}
    if rows := block_errors(record.report):
        tables["tables/reconstruction"] = wandb.Table(columns=BLOCK_COLUMNS, data=rows)
    if rows := curve_block_errors(record.curves):
        tables["tables/curve_block_errors"] = wandb.Table(columns=["curve", "block", "mean", "max"], data=rows)
    if curves:
        columns = list(curves[0])
        tables["tables/curves"] = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in curves])
    return tables


class WandbSink:
    """One W&B run per harness run, opened at its start and fed as it proceeds."""

    def __init__(self, project: str = "diffptq", entity: str | None = None, mode: str = "auto",
                 dir: str | None = None, group: str | None = None,
                 init_timeout: float = DEFAULT_INIT_TIMEOUT, console: str = "wrap", stats: bool = True) -> None:
        if isinstance(init_timeout, bool) or not isinstance(init_timeout, int | float) or init_timeout <= 0:
            raise ValueError(f"<logger.init_timeout={init_timeout}> must be a positive number of seconds")
        if console not in CONSOLE:
            raise ValueError(f"<logger.console={console}> is not a W&B console mode; accepted: {', '.join(CONSOLE)}")
        self.project = project
        self.entity = entity
        self.mode = resolve_mode(mode)
        self.init_timeout = float(init_timeout)
        self.dir = dir
        self.group = group
        self.console = console
        self.stats = bool(stats)
        self.location: str | None = None
        self.errors = 0  # W&B calls that failed (warned); harness/wandb_sync does not index such runs
        self._run: Any = None
        self._started = False
        self._outcome: str | None = None  # the status of the logged record; None: it never came
        self._unsubscribe: Any = None
        self._live_failed = False
        self._recon_step = 0
        self._block_index = 0

    @contextmanager
    def _guard(self, what: str, run_id: str) -> Iterator[None]:
        try:
            yield
        except Exception as err:  # noqa: BLE001 - W&B must never fail a run
            self.errors += 1
            log.warning("W&B %s of run %s failed (the record is safe in the store): %s: %s",
                        what, run_id, type(err).__name__, err)

    def start(self, record: RunRecord, wandb_id: str | None = None, live: bool = True) -> None:
        """Open the W&B run (config, tags, group) and, when `live`, listen to the engine; once per sink."""
        if self._started:
            return
        self._started = True
        with self._guard("start", record.run_id):
            if self.dir:
                Path(self.dir).mkdir(parents=True, exist_ok=True)
            self._run = run = self._init_or_offline(record, wandb_id)
            self.location = run.url if self.mode == "online" else run.sync_dir
            run.define_metric("timestep")
            run.define_metric("curves/*", step_metric="timestep")
            run.define_metric("recon/step")
            run.define_metric("recon/*", step_metric="recon/step")
            run.define_metric("block/index")
            run.define_metric("block/*", step_metric="block/index")
            if live:
                from methods.engine import events  # here: importing `methods` loads every model library

                self._unsubscribe = events.subscribe(self._on_event)

    def phase(self, name: str, seconds: float) -> None:
        """A pipeline step ended: its wall time, now (also the summary's last value)."""
        self._live({f"timings/{name}": seconds})

    def _on_event(self, kind: str, **values: Any) -> None:
        phase = "weights" if values.get("weights") else "acts"
        if kind == "recon_iter":
            self._recon_step += 1
            self._live({"recon/step": self._recon_step, f"recon/loss_{phase}": values["loss"]})
        elif kind == "recon_block":
            self._block_index += 1
            self._live({"block/index": self._block_index, f"block/{phase}/loss_before": values["before"],
                        f"block/{phase}/loss_after": values["after"]})

    def _live(self, payload: dict[str, Any]) -> None:
        """Log while the run runs; the first failure stops live logging (one warning, not one per step)."""
        run = self._run
        if run is None or self._live_failed:
            return
        try:
            run.log(payload)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a run
            self.errors += 1
            self._live_failed = True
            self._stop_listening()
            log.warning("W&B live logging stopped (the run goes on): %s: %s", type(err).__name__, err)

    def log_record(self, record: RunRecord, images: torch.Tensor | None = None, fp_grid: str | None = None) -> None:
        """Log the stored record (summary, curves, tables, grids, artifact) and close the run. `images`
        replaces the grid file; `fp_grid` (else `artifacts["fp_grid"]`) is the FP grid of the same seeds."""
        self.start(record)
        self._stop_listening()
        if self._run is not None:
            with self._guard("logging", record.run_id):
                self._log_end(record, images, fp_grid or record.artifacts.get("fp_grid"))
            self._outcome = record.status
        self.finish()

    def finish(self) -> None:
        """Close the W&B run if one is open: failed (exit code 1) unless a finished record was logged.
        Safe to call any number of times (e.g. in finally)."""
        self._stop_listening()
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=0 if self._outcome == "finished" else 1)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a run
            self.errors += 1
            log.warning("W&B finish failed: %s: %s", type(err).__name__, err)

    def _stop_listening(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def _settings(self) -> Any:
        import wandb

        # offline runs must not touch the network; records carry their own environment block
        return wandb.Settings(mode=self.mode, console=self.console, x_disable_stats=not self.stats,
                              disable_git=True, save_code=False, silent=True, init_timeout=self.init_timeout)

    def _init(self, record: RunRecord, wandb_id: str | None) -> Any:
        import wandb

        return wandb.init(
            project=self.project, entity=self.entity, dir=self.dir, group=self.group, id=wandb_id,
            name=run_name(record), job_type=record.kind, config=run_config(record.config),
            tags=[str(t) for t in (record.model, record.method, record.bits, record.backend, record.variant) if t],
            settings=self._settings(), reinit="create_new",
        )

    def _init_or_offline(self, record: RunRecord, wandb_id: str | None) -> Any:
        """wandb.init bounded by `init_timeout`; an online run that cannot reach the server falls back
        to offline (synced later with `wandb sync`), and so do this process's later runs."""
        host = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)
        if self.mode == "online" and host in _unreachable:
            log.warning("W&B server %s was unreachable earlier in this process; logging run %s offline "
                        "(`wandb sync` its folder later)", host, record.run_id)
            self.mode = "offline"
        try:
            return self._init(record, wandb_id)
        except Exception as err:  # noqa: BLE001 - wandb raises CommError, UsageError, ... when offline
            if self.mode != "online":
                raise
            _unreachable.add(host)
            log.warning("W&B online init failed within %.0f s (%s: %s); logging run %s offline instead",
                        self.init_timeout, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                        record.run_id)
            self.mode = "offline"
            run = self._init(record, wandb_id)
            log.warning("W&B run %s kept offline; upload it later with `wandb sync %s`", record.run_id, run.sync_dir)
            return run

    def _log_end(self, record: RunRecord, images: torch.Tensor | None, fp_grid: str | None) -> None:
        import wandb

        run = self._run
        run.summary.update({"run_id": record.run_id, "status": record.status, "error": record.error,
                            "created": record.created})
        run.summary.update({f"metrics/{k}": v for k, v in record.metrics.items()})
        timings = record.report.get("timings")
        if isinstance(timings, Mapping):
            run.summary.update({f"timings/{k}": v for k, v in timings.items()})
        recipe = record.report.get("recipe")
        if isinstance(recipe, Mapping):  # the knobs the method resolved, e.g. a variant's toggles
            method = run_config(record.config).get("method")
            run.config.update({"method": {**(method if isinstance(method, Mapping) else {}), **recipe}},
                              allow_val_change=True)
        if self._block_index == 0:  # not seen live (a resumed or synced record): from the method report
            for _stage, _block, phase, before, after, *_ in block_errors(record.report):
                self._block_index += 1
                run.log({"block/index": self._block_index, f"block/{phase}/loss_before": before,
                         f"block/{phase}/loss_after": after})
        curves = curve_rows(record.curves)
        for row in curves:
            run.log(row)
        payload: dict[str, Any] = _tables(record, curves)
        name, grid = run_name(record), images if images is not None else record.artifacts.get("grid")
        if isinstance(grid, str) and not Path(grid).is_file():  # outputs/ of another machine
            grid = None
        if grid is not None:
            ev = record.config.get("eval") if isinstance(record.config.get("eval"), Mapping) else {}
            sampler = record.config.get("sampler") if isinstance(record.config.get("sampler"), Mapping) else {}
            caption = (f"{name}: first {ev.get('grid', '?')} samples of eval seed {ev.get('seed', '?')}, "
                       f"{sampler.get('name', record.sampler)} {sampler.get('steps', '?')} steps")
            payload["samples/grid"] = wandb.Image(grid, caption=caption)
            if fp_grid is not None and Path(fp_grid).is_file():
                payload["samples/fp_vs_quantized"] = [wandb.Image(fp_grid, caption="FP, same seeds"),
                                                      wandb.Image(grid, caption=name)]
        run.log(payload)
        record_path = Path(run.dir) / RECORD_FILE
        record_path.write_text(json.dumps(record.to_dict(), indent=1))
        run.save(str(record_path), base_path=run.dir, policy="now")
        artifact = wandb.Artifact(f"record-{record.run_id}", type="run-record",
                                  description=f"{name}: the results-store record and its tables",
                                  metadata={"run_id": record.run_id, "status": record.status})
        artifact.add_file(str(record_path), name="record.json")
        for key, table in _tables(record, curves).items():
            artifact.add(table, key.replace("/", "-"))
        for key in ("grid", "fp_grid"):
            path = record.artifacts.get(key) if key == "grid" else fp_grid
            if path and Path(path).is_file():
                artifact.add_file(path, name=f"{key}.png")
        run.log_artifact(artifact)


def _extractor(record: RunRecord) -> str:
    """The features behind FID/sFID, `auto` resolved as harness/evaluate.py does (LeNet for MNIST)."""
    ev = record.config.get("eval") if isinstance(record.config.get("eval"), Mapping) else {}
    name = str(ev.get("extractor", ""))
    if name == "auto":
        model = record.config.get("model") if isinstance(record.config.get("model"), Mapping) else {}
        return "lenet" if model.get("dataset") == "mnist" else "inception"
    return name


HEADLINE = {"fid": "fid", "sfid": "sfid", "is": "is", "psnr_vs_fp": "psnr_vs_fp", "clip_score": "clip_score",
            "temporal_feature_error_mean": "tfe", "latency_ms": "latency_ms"}  # metric -> metric_info key


def headline(record: RunRecord, where: Path | str, location: str | None = None) -> str:
    """The one console line a run ends with: its label, status, headline metrics with their CIs, the
    calibration time and where the record (and the W&B run, if any) went."""
    label = f"{run_name(record)} {record.status}"
    wandb = f" | W&B {location}" if location else ""
    if not record.finished:
        return f"{label}: {(record.error or '').splitlines()[0] if record.error else '?'} -> {where}{wandb}"
    lenet = _extractor(record) == "lenet"
    parts = []
    for key, info in HEADLINE.items():
        value = record.metrics.get(key)
        if value is None:
            continue
        name = metric_info(info).display
        name = f"LeNet-{name}" if lenet and key in ("fid", "sfid") else name
        text = f"{name} {value:.4g}"
        lo, hi = record.metrics.get(f"{key}_ci_lo"), record.metrics.get(f"{key}_ci_hi")
        if lo is not None and hi is not None:
            text += f" [{lo:.3g}, {hi:.3g}]"
        parts.append(text)
    if "calib_seconds" in record.metrics and record.method != "fp":
        parts.append(f"calib {record.metrics['calib_seconds']:.0f} s")
    return f"{label}: {' '.join(parts) or 'no metrics'} -> {where}{wandb}"


LOGGERS = ("wandb", "none")


def make_sink(logger_cfg: Mapping[str, Any] | None, group: str | None = None) -> Sink:
    """The sink for conf/logger/<name>.yaml; `group` is the sweep id shared by a sweep's runs."""
    cfg = dict(logger_cfg or {"name": "none"})
    name = cfg.pop("name", "none")
    if name not in LOGGERS:
        raise ValueError(f"<logger.name={name}> is not a logger; accepted: {', '.join(LOGGERS)}")
    if name == "none" or resolve_mode(str(cfg.get("mode", "auto"))) == "disabled":
        return NullSink()
    accepted = ("project", "entity", "mode", "dir", "init_timeout", "console", "stats")
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f"logger.wandb has unknown keys {unknown}; accepted: {', '.join(accepted)}")
    return WandbSink(**cfg, group=group)
