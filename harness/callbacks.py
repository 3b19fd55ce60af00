"""Hydra callbacks: sweep-level work that belongs after the last run of a multirun."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.aggregate.cli import aggregate

log = logging.getLogger(__name__)


class AggregateTables(Callback):
    """Regenerate the paper-style tables from the store when a sweep ends, so a sweep's last lines
    say where its tables are. Tables go next to the store (results/store -> results/tables). A
    failure here never hides the runs' results: they are in the store."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        store = Path(config.paths.store)
        try:
            written = aggregate(store, store.parent / "tables")
        except Exception as err:  # noqa: BLE001 - tables are a convenience, the store is the result
            log.warning("could not regenerate tables from %s: %s", store, err)
            return
        for path in written:
            log.info("table: %s", path)
