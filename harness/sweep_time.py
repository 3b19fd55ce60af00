"""Wall time of a whole sweep, of calibration alone, and the sampling throughput against the peak.

    python -m harness.sweep_time                       # the README's default sweep, fresh temp paths
    python -m harness.sweep_time --store results/store --artifacts .cache/artifacts -- eval.n_samples=1000
    python -m harness.sweep_time --calib qdiff tfmq ptq4dm --trees /tmp/before . --rounds 3
    python -m harness.sweep_time --sampling -- eval.n_samples=1000

Sweep (default): runs `python run.py -m <sweep> <overrides>` twice as subprocesses (what a user
types, Hydra start-up included) and prints both wall times and each run's per-phase timings read back
from the store. With the default temp paths nothing is shared with earlier runs, so shared artifacts
(calibration trajectories, FP samples, reference statistics) are built inside the timed sweep.

Calibration (`--calib`): `Method.quantize` of each method, one subprocess per measurement, in each
source tree given (e.g. a `git worktree` of the previous commit beside this checkout), interleaved
round by round (the tree order alternates), so on a shared machine before and after see the same
load. Prints the median seconds per (method, tree), the load average (1 min) around each, the ratio
to the first tree and TFMQ-DM / Q-Diffusion per tree. Calibration rows come from the artifact cache.

Sampling (`--sampling`): FP sampling images/s for `eval.n_samples` images with the run's sampler, the
denoiser's FLOPs per image and step (torch.utils.flop_counter), and the achieved fraction of the
machine's fp32 peak, measured by a large matmul at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_SWEEP = ("method=tfmq,qdiff", "bits=w4a8,w8a8")
ROOT = Path(__file__).resolve().parents[1]

# Runs in a subprocess with cwd = the source tree timed, so it imports that tree's code; it uses only
# entry points that older trees have too.
_CALIB_CHILD = r"""
import json, os, sys
import torch
torch.set_num_threads(int(os.environ["SWEEP_TIME_THREADS"]))
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from harness.artifacts import ArtifactCache
from harness.models.zoo import load_model
from harness.references import References
from harness.runner import quant_spec, validate
from harness.sampling import schedule_timesteps
from methods import METHODS
with initialize_config_dir(config_dir=os.path.join(os.getcwd(), "conf"), version_base="1.3"):
    cfg = compose(config_name="config", overrides=json.loads(os.environ["SWEEP_TIME_OVERRIDES"]))
raw = OmegaConf.to_container(cfg, resolve=True)
raw.pop("hydra", None)
rc, _ = validate(raw)
model = load_model(rc.model)
refs = References(rc, model, ArtifactCache(rc.paths["artifacts"]))
method = METHODS.get(rc.method["name"])(rc.method, rc.recipe)
need = method.calibration_rows_per_step(schedule_timesteps(model, rc.sampler),
                                        int(model.scheduler_config.get("num_train_timesteps", 1000)))
calib = refs.calibration(need)
load = os.getloadavg()[0]
seconds = method.quantize(model, calib, quant_spec(rc)).report.calib_seconds
print("SWEEP_TIME " + json.dumps({"seconds": seconds, "load_before": load, "load_after": os.getloadavg()[0]}))
"""


def timed_sweep(args: list[str]) -> float:
    """Seconds one `run.py -m` invocation takes; a non-zero exit stops the benchmark."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def artifact_builds(artifacts: Path) -> str:
    """How many shared artifacts of each kind were built (the cache's builds.log): under a parallel
    launcher each one must still be built once."""
    from harness.artifacts import BUILDS_LOG  # torch: only after the timed sweeps

    log = Path(artifacts) / BUILDS_LOG
    builds = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    kinds = [b["kind"] for b in builds]
    per_kind = ", ".join(f"{k} {kinds.count(k)}" for k in sorted(set(kinds)))
    return f"{len(builds)} ({per_kind}; {len({b['path'] for b in builds})} distinct files)" if builds else "0"


def budget_split(records: list[Any], wall: float, budget: float) -> str:
    """Where a from-scratch sweep's wall time went: calibration (`quantize`) against everything else
    (sampling, metrics, FP reference, artifacts, Hydra start-up), and what each calibration could
    take if the rest stayed as measured and the sweep had to fit `budget` seconds."""
    calib = [r.report.get("timings", {}).get("quantize", 0.0) for r in records]
    calibrated = sum(1 for c in calib if c > 0)
    rest = wall - sum(calib)
    line = (f"calibration {sum(calib):.1f} s in {calibrated} run(s); everything else {rest:.1f} s "
            f"({100 * rest / wall:.0f} % of the sweep)")
    if calibrated:
        room = (budget - rest) / calibrated
        line += (f"; to fit {budget:.0f} s with the rest as measured, each calibration would need "
                 + (f"<= {room:.1f} s" if room > 0 else f"less than 0 s: the rest alone is over {budget:.0f} s"))
    return line


def time_calibration(tree: Path, method: str, overrides: list[str], threads: int) -> dict[str, Any]:
    """One `Method.quantize` of `method` with the code of `tree`, in a fresh process."""
    env = {**os.environ, "SWEEP_TIME_THREADS": str(threads), "TQDM_DISABLE": "1",
           "SWEEP_TIME_OVERRIDES": json.dumps([f"method={method}", *overrides])}
    out = subprocess.run([sys.executable, "-c", _CALIB_CHILD], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("SWEEP_TIME "))
    return json.loads(line.removeprefix("SWEEP_TIME "))


def calibration_table(methods: list[str], trees: list[Path], rounds: int, overrides: list[str],
                      threads: int) -> str:
    """Interleaved calibration timings of `methods` x `trees`, summarised as medians and ratios."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in range(rounds):
        for method in methods:
            order = list(enumerate(trees))
            for i, tree in order if r % 2 == 0 else order[::-1]:
                res = time_calibration(tree, method, overrides, threads)
                runs.setdefault((method, i), []).append(res)
                print(f"round {r + 1} {method:<8} {tree}: {res['seconds']:.1f} s "
                      f"(load {res['load_before']:.2f} -> {res['load_after']:.2f})", flush=True)
    med = {k: statistics.median(v["seconds"] for v in vs) for k, vs in runs.items()}
    lines = [f"calibration, median of {rounds} interleaved rounds, {threads} thread(s), overrides: "
             f"{' '.join(overrides) or '(none)'}",
             f"{'method':<9}{'tree':<28}{'median s':>10}{'runs s':>28}{'load 1-min':>22}{'vs tree 0':>11}"]
    for method in methods:
        for i, tree in enumerate(trees):
            vs = runs[(method, i)]
            loads = ", ".join(f"{v['load_before']:.1f}" for v in vs)
            each = ", ".join(f"{v['seconds']:.0f}" for v in vs)
            lines.append(f"{method:<9}{str(tree)[-27:]:<28}{med[(method, i)]:>10.1f}{each:>28}{loads:>22}"
                         f"{med[(method, i)] / med[(method, 0)]:>10.2f}x")
    if "tfmq" in methods and "qdiff" in methods:
        for i, tree in enumerate(trees):
            lines.append(f"TFMQ-DM / Q-Diffusion, {tree}: {med[('tfmq', i)] / med[('qdiff', i)]:.2f}")
    return "\n".join(lines)


def sampling_throughput(overrides: list[str], threads: int) -> str:
    """FP images/s of the run's sampler against the machine's measured fp32 matmul peak."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from harness.models.base import denoise
    from harness.models.zoo import load_model
    from harness.runner import validate
    from harness.sampling import sample

    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=fp", *overrides])
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    rc, _ = validate(raw)
    model = load_model(rc.model)
    e, batch = rc.eval, min(rc.eval.batch_size, rc.eval.n_samples)
    x = torch.zeros(batch, *model.sample_shape)
    t = torch.full((batch,), 500, dtype=torch.long)
    cond = None if model.conditions is None else model.conditions.embed(model.conditions.draw(0, 0, batch))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoise(model, x, t, cond)
    calls = 2 if model.is_conditional and model.guidance_scale != 1.0 else 1  # CFG: two branches per step
    flops_per_image = counter.get_total_flops() / batch * calls * rc.sampler.steps
    a = torch.randn(2048, 2048)
    a @ a
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ a
    peak = 2 * 2048**3 * reps / (time.perf_counter() - start)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    sample(model, rc.sampler, e.n_samples, e.batch_size, e.seed, desc="sweep_time sampling")
    wall = time.perf_counter() - start
    ips, load_after = e.n_samples / wall, os.getloadavg()[0]
    return (f"sampling {e.n_samples} FP images, {rc.sampler.name} {rc.sampler.steps} steps, batch {e.batch_size}, "
            f"{threads} thread(s): {wall:.1f} s, {ips:.2f} images/s (load 1-min {load:.2f} -> {load_after:.2f})\n"
            f"denoiser FLOPs per image (all steps): {flops_per_image / 1e9:.2f} GFLOP; achieved "
            f"{ips * flops_per_image / 1e9:.1f} GFLOP/s; fp32 matmul peak (2048^3) {peak / 1e9:.1f} GFLOP/s "
            f"-> {100 * ips * flops_per_image / peak:.1f} % of peak")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=None, help="results store (default: a fresh temp folder)")
    p.add_argument("--artifacts", type=Path, default=None, help="artifact cache (default: a fresh temp folder; "
                   "--calib: this checkout's .cache/artifacts)")
    p.add_argument("--sweep", nargs="+", default=list(DEFAULT_SWEEP), help="the swept overrides")
    p.add_argument("--calib", nargs="+", default=None, metavar="METHOD", help="time calibration of these methods")
    p.add_argument("--trees", nargs="+", type=Path, default=[ROOT], help="--calib: source trees to compare")
    p.add_argument("--rounds", type=int, default=3, help="--calib: interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="--calib / --sampling: torch threads")
    p.add_argument("--sampling", action="store_true", help="FP sampling images/s against the fp32 peak")
    p.add_argument("--budget", type=float, default=600.0, help="sweep: the wall-time budget (s) to split")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = p.parse_args(argv)
    if a.calib:
        artifacts = (a.artifacts or ROOT / ".cache" / "artifacts").resolve()
        trees = [t.resolve() for t in a.trees]
        print(calibration_table(a.calib, trees, a.rounds, [f"paths.artifacts={artifacts}", *a.overrides],
                                a.threads))
        return
    if a.sampling:
        artifacts = [f"paths.artifacts={a.artifacts}"] if a.artifacts else []
        print(sampling_throughput([*artifacts, *a.overrides], a.threads))
        return
    from harness.store import ResultsStore

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
        print(budget_split(records, first, a.budget))
        print(f"artifact builds: {artifact_builds(artifacts)}")
        print(f"store: {store}")


if __name__ == "__main__":
    main()
