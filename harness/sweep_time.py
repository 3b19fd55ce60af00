"""Wall time of a whole sweep from scratch, then of the same sweep again (every run resumed).

    python -m harness.sweep_time                       # the README's default sweep, fresh temp paths
    python -m harness.sweep_time --store results/store --artifacts .cache/artifacts -- eval.n_samples=1000

Runs `python run.py -m <sweep> <overrides>` twice as subprocesses (what a user types, Hydra start-up
included) and prints both wall times and each run's per-phase timings read back from the store.
With the default temp paths nothing is shared with earlier runs, so shared artifacts (calibration
trajectories, FP samples, reference statistics) are built inside the timed sweep.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.store import ResultsStore

DEFAULT_SWEEP = ("method=tfmq,qdiff", "bits=w4a8,w8a8")
ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(args: list[str]) -> float:
    """Seconds one `run.py -m` invocation takes; a non-zero exit stops the benchmark."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="results store (default: a fresh temp folder)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact cache (default: a fresh temp folder)")
    p.add_argument("--sweep", nargs="+", default=list(DEFAULT_SWEEP), help="the swept overrides")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sweep_time_") as tmp:
        store = a.store or Path(tmp) / "store"
        artifacts = a.artifacts or Path(tmp) / "artifacts"
        # Outputs (grids) go where the store's records will point: a temp store gets temp outputs.
        outputs = [] if a.store else [f"paths.outputs={Path(tmp) / 'outputs'}"]
        args = [*a.sweep, f"paths.store={store}", f"paths.artifacts={artifacts}", *outputs, *a.overrides]
        before = {r.run_id for r in ResultsStore(store).records()}
        first = timed_sweep(args)
        again = timed_sweep(args)
        records = [r for r in ResultsStore(store).records() if r.run_id not in before]
        print(f"\nsweep {' '.join(a.sweep)} {' '.join(a.overrides)}")
        print(f"{'run':<34}{'status':>10}{'total s':>10}  phases (s)")
        for r in sorted(records, key=lambda r: r.created):
            t = r.report.get("timings", {})
            phases = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "run_total")
            print(f"{r.method + '/' + r.bits + '/' + r.run_id[:8]:<34}{r.status:>10}"
                  f"{t.get('run_total', float('nan')):>10.1f}  {phases}")
        print(f"\nfrom scratch: {first:.1f} s ({first / 60:.1f} min); rerun, all resumed: {again:.1f} s")
        print(f"store: {store}")


if __name__ == "__main__":
    main()
