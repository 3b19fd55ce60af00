"""Entry point: compose the config with Hydra and hand it to the harness.

    python run.py                                   # one run (conf/config.yaml defaults)
    python run.py -m method=tfmq,qdiff bits=w4a8,w8a8   # a sweep (Hydra multirun)
"""

import hydra
from omegaconf import DictConfig

from harness.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
