"""Where a method's calibration time goes: quantize() under torch.profiler, summarised per phase.

    python -m harness.profile_calibration method=qdiff bits=w4a8 profile.iters=100
    python -m harness.profile_calibration method=tfmq profile.iters=null      # the recipe's iterations

conf/profile_calibration.yaml is conf/config.yaml (the same model / method / bits / recipe groups as
run.py) plus a `profile` node. The calibration rows are the run's shared artifact (built once, as
run.py would). The summary, written to `<profile.out>/<method>.txt`, has the wall time with and
without the profiler attached, the load average around each, the split over the engine's phases
(methods/engine/phases.py: capture of block inputs / FP targets, forward of the quantized block,
regularizer, backward, optimizer, loss evaluation, range init; "other" is the rest, e.g. TFMQ's
caches), timed without a profiler, and the top ops by self CPU time of a second, shorter run under
torch.profiler (`profile.op_iters`: the profiler keeps every op event, tens of GB at 100 iterations).
`profile.iters` shortens every reconstruction loop the same way, so the split keeps its shape at a
fraction of the cost.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from harness.artifacts import ArtifactCache
from harness.models.zoo import load_model
from harness.references import References
from harness.runner import quant_spec, resolve_device, validate
from harness.sampling import schedule_timesteps
from methods import METHODS
from methods.engine import phases

CONF = Path(__file__).resolve().parents[1] / "conf"
ITER_KEYS = ("iters", "act_iters", "tiar_iters")


def with_iters(method_cfg: dict[str, Any], recipe: str, iters: int | None) -> dict[str, Any]:
    """The method config with every reconstruction loop of `recipe` set to `iters` (None: unchanged)."""
    if iters is None:
        return method_cfg
    cfg = {**method_cfg, "recipes": {k: dict(v) for k, v in (method_cfg.get("recipes") or {}).items()}}
    target = cfg["recipes"].setdefault(recipe, {})
    for key in ITER_KEYS:
        if key in target or key in cfg:
            target[key] = int(iters)
    return cfg


def phase_rows(totals: dict[str, float], wall: float) -> list[tuple[str, float]]:
    """Seconds per engine phase, then "other" (the rest of the wall time: quantizer insertion,
    TFMQ's caches and selection, ...). Phases do not nest, so the rows add up to the wall time."""
    rows = [(label.split("/", 1)[1], totals.get(label, 0.0)) for label in phases.ALL]
    return [*rows, ("other", max(0.0, wall - sum(s for _, s in rows)))]


def _load(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> str:
    overrides = list(sys.argv[1:] if argv is None else argv)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="profile_calibration", overrides=overrides)
    raw = OmegaConf.to_container(cfg, resolve=True)
    prof_cfg = raw.pop("profile")
    raw.pop("hydra", None)
    raw["method"] = with_iters(raw["method"], str(raw.get("recipe", "quick")), prof_cfg["iters"])
    rc, _ = validate(raw)
    torch.set_num_threads(int(prof_cfg["threads"]))
    torch.manual_seed(rc.seed)

    model = load_model(rc.model).to(resolve_device(rc.device))
    refs = References(rc, model, ArtifactCache(rc.paths["artifacts"], rc.paths.get("lock_mode", "os")))
    spec = quant_spec(rc)
    if spec is None:
        raise SystemExit("the FP method has no calibration to profile; pick method=rtn|ptq4dm|qdiff|tfmq")
    method = METHODS.get(rc.method["name"])(rc.method, rc.recipe)
    need = method.calibration_rows_per_step(schedule_timesteps(model, rc.sampler),
                                            int(model.scheduler_config.get("num_train_timesteps", 1000)))
    calib = refs.calibration(need)

    load_timed = os.getloadavg()
    with phases.timing() as totals:
        wall = method.quantize(model, calib, spec).report.calib_seconds
    load_prof = os.getloadavg()
    # The profiler keeps every op event (about 20 GB for Q-Diffusion at 100 iterations): profile a
    # shorter run for the op table; the phase split above comes from the full run without it.
    short = METHODS.get(rc.method["name"])(with_iters(rc.method, rc.recipe, prof_cfg["op_iters"]), rc.recipe)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        short.quantize(model, calib, spec)
        profiled = time.perf_counter() - start
    load_end = os.getloadavg()
    iters = prof_cfg["iters"] if prof_cfg["iters"] is not None else "as the recipe"
    lines = [
        f"# calibration profile: {rc.method['name']} {rc.bits_tag} on {rc.model['name']}, recipe {rc.recipe}",
        f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, "
        f"{len(calib)} calibration rows captured",
        "",
        f"## phases: reconstruction iterations {iters}, no profiler attached",
        f"wall {wall:.1f} s; load average before {_load(load_timed)}, after {_load(load_prof)}",
        f"{'phase':<14}{'seconds':>10}{'share':>9}",
    ]
    for name, sec in phase_rows(totals, wall):
        lines.append(f"{name:<14}{sec:>10.2f}{100 * sec / wall:>8.1f}%")
    lines += ["", f"## top {prof_cfg['top']} ops by self CPU time: reconstruction iterations {prof_cfg['op_iters']}, "
              f"profiled wall {profiled:.1f} s; load average after {_load(load_end)}",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=int(prof_cfg["top"]),
                                        max_name_column_width=48)]
    text = "\n".join(lines)
    print(text)
    if str(prof_cfg["out"]) != "none":
        out = Path(prof_cfg["out"]) / f"{rc.method['name']}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"written: {out}")
    return text


if __name__ == "__main__":
    main()
