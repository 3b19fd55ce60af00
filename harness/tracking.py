"""Sinks fed from a finished run record: Weights & Biases, or nothing.

The record is written to the results store before any sink sees it, so a sink can never lose a
result; W&B errors are logged as warnings and never fail the run. W&B runs offline unless the
user has credentials (WANDB_API_KEY, or a netrc entry for the W&B host) or the config asks for
`mode: online`, so a sweep never waits on the network; `wandb sync <dir>` uploads later. When the
server cannot be reached, `wandb.init` gives up after `init_timeout` seconds (W&B's own default is
90 s) and the run is logged offline instead, with a warning; the rest of the process's runs go
offline at once rather than each waiting again.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import torch

from harness.store import RunRecord

log = logging.getLogger(__name__)

MODES = ("auto", "offline", "online", "disabled")
DEFAULT_WANDB_HOST = "https://api.wandb.ai"
RECORD_FILE = "run_record.json"
DEFAULT_INIT_TIMEOUT = 30.0
_unreachable: set[str] = set()  # W&B hosts that timed out in this process: later runs go offline at once


class Sink(Protocol):
    """Where a finished record is mirrored; `location` says where it went (dir or URL)."""

    location: str | None

    def log_record(self, record: RunRecord, images: torch.Tensor | None = None) -> None: ...

    def finish(self) -> None: ...


class NullSink:
    """`logger=none`: the store alone keeps the result."""

    location: str | None = None

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


def _curve_plots(curves: Mapping[str, Any]) -> dict[str, Any]:
    """One W&B line plot per series aligned with `timesteps`; nested dicts become multi-line plots."""
    import wandb

    steps = list(curves.get("timesteps") or [])
    plots: dict[str, Any] = {}
    for key, series in curves.items():
        if key == "timesteps":
            continue
        if isinstance(series, Mapping):
            rows = [[t, float(v), str(name)] for name, values in series.items()
                    if len(values) == len(steps) for t, v in zip(steps, values, strict=True)]
            table = wandb.Table(data=rows, columns=["timestep", key, "series"])
            plots[f"curves/{key}"] = wandb.plot.line(table, "timestep", key, stroke="series", title=key)
        elif isinstance(series, Sequence) and len(series) == len(steps) and steps:
            table = wandb.Table(data=[[t, float(v)] for t, v in zip(steps, series, strict=True)],
                                columns=["timestep", key])
            plots[f"curves/{key}"] = wandb.plot.line(table, "timestep", key, title=key)
        else:
            log.warning("W&B: curve %r is not aligned with %d timesteps; not plotted", key, len(steps))
    return plots


class WandbSink:
    """Mirrors one finished record into one W&B run (config, metrics, curves, grid, the record)."""

    def __init__(self, project: str = "diffptq", entity: str | None = None, mode: str = "auto",
                 dir: str | None = None, group: str | None = None,
                 init_timeout: float = DEFAULT_INIT_TIMEOUT) -> None:
        if isinstance(init_timeout, bool) or not isinstance(init_timeout, int | float) or init_timeout <= 0:
            raise ValueError(f"<logger.init_timeout={init_timeout}> must be a positive number of seconds")
        self.project = project
        self.entity = entity
        self.mode = resolve_mode(mode)
        self.init_timeout = float(init_timeout)
        self.dir = dir
        self.group = group
        self.location: str | None = None
        self._run: Any = None
        self._failed = False

    def log_record(self, record: RunRecord, images: torch.Tensor | None = None) -> None:
        """Log the record; any W&B error becomes a warning (the store already holds the result)."""
        try:
            self._log(record, images)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a run
            log.warning("W&B logging of run %s failed (the record is safe in the store): %s: %s",
                        record.run_id, type(err).__name__, err)
        finally:
            self.finish()

    def finish(self) -> None:
        """Close the W&B run if one is open; safe to call any number of times (e.g. in finally)."""
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish(exit_code=1 if self._failed else 0)
        except Exception as err:  # noqa: BLE001 - W&B must never fail a run
            log.warning("W&B finish failed: %s: %s", type(err).__name__, err)

    def _settings(self) -> Any:
        import wandb

        offline = self.mode == "offline"
        # console capture and the stats sampler are the slow, noisy parts; records carry our own
        # environment block, and offline runs must not touch the network at all.
        return wandb.Settings(mode=self.mode, console="off", x_disable_stats=offline, disable_git=True,
                              save_code=False, silent=True, init_timeout=self.init_timeout)

    def _init(self, record: RunRecord) -> Any:
        import wandb

        return wandb.init(
            project=self.project, entity=self.entity, dir=self.dir, group=self.group,
            name=run_name(record), job_type=record.kind, config=record.config,
            tags=[str(t) for t in (record.model, record.method, record.bits, record.backend, record.variant) if t],
            settings=self._settings(), reinit="create_new",
        )

    def _init_or_offline(self, record: RunRecord) -> Any:
        """wandb.init bounded by `init_timeout`; an online run that cannot reach the server falls back
        to offline (synced later with `wandb sync`), and so do this process's later runs."""
        host = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)
        if self.mode == "online" and host in _unreachable:
            log.warning("W&B server %s was unreachable earlier in this process; logging run %s offline "
                        "(`wandb sync` its folder later)", host, record.run_id)
            self.mode = "offline"
        try:
            return self._init(record)
        except Exception as err:  # noqa: BLE001 - wandb raises CommError, UsageError, ... when offline
            if self.mode != "online":
                raise
            _unreachable.add(host)
            log.warning("W&B online init failed within %.0f s (%s: %s); logging run %s offline instead",
                        self.init_timeout, type(err).__name__, str(err).splitlines()[0] if str(err) else "",
                        record.run_id)
            self.mode = "offline"
            run = self._init(record)
            log.warning("W&B run %s kept offline; upload it later with `wandb sync %s`", record.run_id, run.sync_dir)
            return run

    def _log(self, record: RunRecord, images: torch.Tensor | None) -> None:
        import wandb

        if self.dir:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        self._failed = not record.finished
        self._run = run = self._init_or_offline(record)
        self.location = run.url if self.mode == "online" else run.sync_dir
        run.summary.update({"run_id": record.run_id, "status": record.status, "error": record.error})
        payload: dict[str, Any] = {f"metrics/{k}": v for k, v in record.metrics.items()}
        payload.update(_curve_plots(record.curves))
        grid = images if images is not None else record.artifacts.get("grid")
        if grid is not None and (images is not None or Path(grid).is_file()):
            payload["samples/grid"] = wandb.Image(grid)
        run.log(payload)
        record_path = Path(run.dir) / RECORD_FILE
        record_path.write_text(json.dumps(record.to_dict(), indent=1))
        run.save(str(record_path), base_path=run.dir, policy="now")


LOGGERS = ("wandb", "none")


def make_sink(logger_cfg: Mapping[str, Any] | None, group: str | None = None) -> Sink:
    """The sink for conf/logger/<name>.yaml; `group` is the sweep id shared by a sweep's runs."""
    cfg = dict(logger_cfg or {"name": "none"})
    name = cfg.pop("name", "none")
    if name not in LOGGERS:
        raise ValueError(f"<logger.name={name}> is not a logger; accepted: {', '.join(LOGGERS)}")
    if name == "none" or resolve_mode(str(cfg.get("mode", "auto"))) == "disabled":
        return NullSink()
    accepted = ("project", "entity", "mode", "dir", "init_timeout")
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise ValueError(f"logger.wandb has unknown keys {unknown}; accepted: {', '.join(accepted)}")
    return WandbSink(**cfg, group=group)
