"""Entry point: compose the config with Hydra and hand it to the harness.

    python run.py                                        # one run (conf/config.yaml defaults)
    python run.py -m method=tfmq,qdiff bits=w4a8,w8a8    # a sweep (Hydra multirun)
"""

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness.callbacks import ledger_path, note_outcome
from harness.identity import finished_record


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    stored = finished_record(cfg)
    if stored is not None:  # resumed without importing the engine (torch, diffusers): milliseconds
        note_outcome(ledger_path(hc) if os.environ.get("RANK", "0") == "0" else None, stored, "resumed")
        return
    from harness.runner import run  # the engine, for a run with work to do

    # Runs of one sweep share a W&B group: the sweep's folder name.
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    run(cfg, group=group, ledger=ledger_path(hc))  # never raises: harness/callbacks.py sets the exit code


if __name__ == "__main__":
    main()
