"""Harness overhead per run: wall time outside denoiser calls, the method and metric work.

    python -m harness.overhead [hydra overrides...]

Runs one configuration in-process (fresh store and artifact cache in a temp folder, W&B offline by
default) and splits its wall time using the per-phase timings every record carries. Work phases
(calibration-data capture, the method, FP reference sampling, sampling, metrics incl. feature
extraction and latency) are excluded; everything else (config validation, model load, hashing and
artifact I/O, backend preparation, grid, store write, W&B logging) is the harness's overhead.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness.runner import run

WORK_PHASES = ("calibration_data", "quantize", "fp_reference", "sampling", "metrics")
CONF = str(Path(__file__).resolve().parents[1] / "conf")


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"paths.store={tmp}/store", f"paths.artifacts={tmp}/artifacts", f"paths.outputs={tmp}/out"]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["fp_reference=false", *paths, *overrides])
        start = time.perf_counter()
        record = run(cfg)
        total = time.perf_counter() - start
    if record.status != "finished":
        raise SystemExit(f"run failed: {record.error}")
    timings = record.report["timings"]
    work = sum(timings.get(p, 0.0) for p in WORK_PHASES)
    print(f"{'phase':<18}{'seconds':>10}")
    for name, sec in timings.items():
        print(f"{name:<18}{sec:>10.2f}{'  (work)' if name in WORK_PHASES else ''}")
    print(f"{'total (wall)':<18}{total:>10.2f}")
    print(f"harness overhead: {total - work:.2f} s = {100 * (total - work) / total:.1f} % of the run")


if __name__ == "__main__":
    main(sys.argv[1:])
