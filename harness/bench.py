"""Latency benchmark: FP vs W8A8 vs W4A8 on every backend, for one model, measured side by side.

    python -m harness.bench model=ddpm_mnist
    python -m harness.bench model=ddpm_cifar10 init=random batch_sizes=1,16 iters=5
    python -m harness.bench --help        # every key and its default

Quantization is RTN (methods/rtn.py) on random calibration inputs: weight values do not change
speed, so this times exactly what a calibrated run would execute. Each (bits, backend) cell is
prepared once, then all cells are timed in `rounds` interleaved rounds (median of the per-round
medians), so a load spike on a shared machine hits every cell alike. With `tfmq_cache=true`, the
W8A8 model is also timed with TFMQ's cache-based maintenance (FP temporal features served from a
per-timestep quantized cache, the TIB skipped) at batch 1, the setting where skipping the TIB shows.
One record of kind "latency" per cell goes to the results store (`store=none` to skip).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from harness.backends import BACKENDS
from harness.calibration import CalibData
from harness.environment import collect_environment
from harness.metrics.latency import fp32_weight_bytes, measure_latency, weight_bytes
from harness.models.base import DiffusionModel
from harness.models.zoo import load_model
from harness.run_id import run_id
from harness.store import ResultsStore, RunRecord
from methods.base import METHODS
from methods.engine.modules import QuantSpec

CONF = Path(__file__).resolve().parents[1] / "conf"
# The ddpm_mnist architecture, for benchmarking before its trained weights exist (init=random).
MNIST_ARCH: dict[str, Any] = {
    "sample_size": 28, "in_channels": 1, "out_channels": 1, "block_out_channels": [16, 32, 64],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
}
DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
BITS_RE = re.compile(r"^w(\d+)a(\d+)$")


@dataclass
class BenchConfig:
    """Keys of `python -m harness.bench key=value ...` (lists comma-separated)."""

    model: str = "ddpm_mnist"  # conf/model/<model>.yaml
    init: str = "auto"  # auto (pretrained if its weights load, else random) | pretrained | random
    bits: list[str] = field(default_factory=lambda: ["fp", "w8a8", "w4a8"])
    backends: list[str] = field(default_factory=lambda: ["fake", "int8", "openvino"])
    int8_kernels: list[str] = field(default_factory=lambda: ["onednn", "int_mm"])  # one int8 cell each
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 2
    iters: int = 5
    rounds: int = 3
    threads: int = 0  # torch / OpenVINO threads; 0 = library default
    calib_rows: int = 32
    steps: int = 10  # sampler steps of the (random) calibration schedule
    tfmq_cache: bool = True
    store: str = "results/store"  # "none": print only
    seed: int = 0


def parse_config(tokens: list[str]) -> BenchConfig:
    """key=value tokens -> BenchConfig; unknown keys fail with the accepted ones."""
    cfg = BenchConfig()
    names = {f.name: f for f in fields(BenchConfig)}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or key not in names:
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ValueError(f"<{token}> is not key=value with a known key; accepted: {', '.join(names)}.{hint}")
        default = getattr(BenchConfig(), key)
        if isinstance(default, list):
            items = [v for v in value.split(",") if v]
            setattr(cfg, key, [int(v) for v in items] if key == "batch_sizes" else items)
        elif isinstance(default, bool):
            setattr(cfg, key, value.lower() in ("1", "true", "yes"))
        else:
            setattr(cfg, key, type(default)(value))
    for tag in cfg.bits:
        if tag != "fp" and not BITS_RE.match(tag):
            raise ValueError(f"<bits={tag}> must be fp or wXaY (e.g. w8a8, w4a8, w4a32)")
    for name in cfg.backends:
        BACKENDS.get(name)
    return cfg


def spec_of(tag: str) -> QuantSpec | None:
    if tag == "fp":
        return None
    w, a = (int(v) for v in BITS_RE.match(tag).groups())
    return QuantSpec(w, None if a == 32 else a)


def load_bench_model(cfg: BenchConfig) -> tuple[DiffusionModel, str]:
    """The model of conf/model/<model>.yaml; with init=auto, random weights if its own are missing."""
    mcfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{cfg.model}.yaml"), resolve=True)
    if cfg.init in ("auto", "pretrained"):
        try:
            return load_model(mcfg), str(mcfg.get("init", "pretrained"))
        except (OSError, ValueError) as err:
            if cfg.init == "pretrained":
                raise
            print(f"[bench] {cfg.model}: no pretrained weights ({type(err).__name__}); using random init",
                  file=sys.stderr)
    mcfg.update(init="random", path=None, weights=None, hub_id=None)
    mcfg["arch"] = mcfg.get("arch") or MNIST_ARCH
    mcfg["scheduler"] = mcfg.get("scheduler") or DEFAULT_SCHEDULER
    return load_model(mcfg), "random"


def random_calib(model: DiffusionModel, rows: int, steps: int, seed: int) -> CalibData:
    """Calibration rows with Gaussian x_t over an evenly spaced schedule (enough for timing)."""
    gen = torch.Generator().manual_seed(seed)
    total = int(model.scheduler_config.get("num_train_timesteps", 1000))
    schedule = list(range(total - 1, -1, -max(1, total // steps)))[:steps]
    t = torch.tensor([schedule[i % len(schedule)] for i in range(rows)])
    labels: list[int] = []
    cond = None
    if model.num_classes is not None:
        labels = list(range(model.num_classes + 1))
        cond = torch.randint(model.num_classes + 1, (rows,), generator=gen)
    elif model.cond_shape is not None:
        cond = torch.randn(rows, *model.cond_shape, generator=gen)
    return CalibData(torch.randn(rows, *model.sample_shape, generator=gen), t, cond, schedule, total, labels)


def quantize(model: DiffusionModel, calib: CalibData, tag: str, cfg: BenchConfig) -> DiffusionModel:
    """RTN at `tag` (the method's own yaml, quick recipe, fewer calibration rows); FP as is."""
    spec = spec_of(tag)
    if spec is None:
        return model
    mcfg = OmegaConf.to_container(OmegaConf.load(CONF / "method" / "rtn.yaml"), resolve=True)
    mcfg["recipes"]["quick"].update(calib_rows=cfg.calib_rows, batch_size=cfg.calib_rows)
    return METHODS.get("rtn")(mcfg, "quick").quantize(model, calib, spec).model


def with_feature_cache(fp: DiffusionModel, qmodel: DiffusionModel, calib: CalibData,
                       spec: QuantSpec) -> DiffusionModel | None:
    """`qmodel` with TFMQ's cache-based maintenance installed, or None when TFMQ is unavailable or
    the model's temporal features are not cacheable."""
    try:
        from methods.temporal.cache import build_caches, install_caches, skip_embedders
        from methods.temporal.labels import install_label_context
        from methods.temporal.tib import find_tib
    except ImportError:
        return None
    tib = find_tib(fp.net)
    if not tib.cacheable:
        return None
    cached = qmodel.with_net(copy.deepcopy(qmodel.net))
    install_label_context(cached.net)
    caches = build_caches(fp.net, tib, tib.features, calib.schedule, calib.labels, spec.act_bits)
    install_caches(cached.net, caches)
    probe = calib.subset(torch.arange(1))
    skip_embedders(cached, tib, (probe.x, probe.t, probe.cond))
    return cached


@dataclass
class Cell:
    """One (bits, backend) combination, prepared and ready to time."""

    bits: str
    backend: str
    method: str
    exe: DiffusionModel
    qmodel: DiffusionModel
    describe: dict[str, Any]
    batch_sizes: list[int]
    timings: list[dict[str, Any]] = field(default_factory=list)


def prepare_cells(fp: DiffusionModel, calib: CalibData, cfg: BenchConfig) -> list[Cell]:
    cells: list[Cell] = []
    for tag in cfg.bits:
        qmodel = quantize(fp, calib, tag, cfg)
        spec = spec_of(tag)
        variants: list[tuple[str, DiffusionModel, list[int]]] = [("fp" if spec is None else "rtn", qmodel,
                                                                 cfg.batch_sizes)]
        if cfg.tfmq_cache and spec is not None and spec.act_bits is not None and tag == "w8a8":
            cached = with_feature_cache(fp, qmodel, calib, spec)
            if cached is not None:
                variants.append(("rtn+cache", cached, [1]))
        for method, model, batches in variants:
            for backend, bcfg in backend_configs(cfg):
                be = BACKENDS.get(bcfg["name"])(bcfg)
                print(f"[bench] preparing {tag} {method} on {backend}", file=sys.stderr)
                exe = be.prepare(model, spec)
                cells.append(Cell(tag, backend, method, exe, model, be.describe(), batches))
    return cells


def backend_configs(cfg: BenchConfig) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for name in cfg.backends:
        if name == "int8":
            out += [(f"int8-{k}", {"name": "int8", "kernel": k}) for k in cfg.int8_kernels]
        elif name == "openvino":
            out.append((name, {"name": name, "num_threads": cfg.threads or None}))
        else:
            out.append((name, {"name": name}))
    return out


def time_cells(cells: list[Cell], cfg: BenchConfig, timestep: int) -> None:
    """`rounds` interleaved passes over all cells: every cell sees the same machine load."""
    for r in range(cfg.rounds):
        for cell in cells:
            print(f"[bench] round {r + 1}/{cfg.rounds}: {cell.bits} {cell.method} {cell.backend}", file=sys.stderr)
            cell.timings.append(measure_latency(cell.exe, cell.batch_sizes, cfg.warmup, cfg.iters, timestep))


def summarize(cell: Cell, fp_bytes: int) -> dict[str, Any]:
    """Median over rounds of each batch size's median ms per call, plus memory facts."""
    out: dict[str, Any] = {}
    for i, b in enumerate(cell.batch_sizes):
        per_round = [t["per_batch"][i] for t in cell.timings]
        ms = statistics.median(p["ms_per_call"] for p in per_round)
        out[f"latency_ms_b{b}"] = ms
        out[f"ms_per_image_b{b}"] = ms / b
        out[f"peak_memory_bytes_b{b}"] = max(p["peak_memory_bytes"] for p in per_round)
    out["latency_ms"] = out[f"latency_ms_b{cell.batch_sizes[0]}"]
    out["latency_per_image_ms"] = out[f"ms_per_image_b{cell.batch_sizes[-1]}"]
    out["weight_bytes"] = weight_bytes(cell.qmodel.net)
    out["fp32_weight_bytes"] = fp_bytes
    out["compression_vs_fp32"] = fp_bytes / out["weight_bytes"]
    if "packed_weight_bytes" in cell.describe:
        out["packed_weight_bytes"] = cell.describe["packed_weight_bytes"]
        out["packed_layers_compression"] = cell.describe["fp32_weight_bytes"] / cell.describe["packed_weight_bytes"]
    return out


def format_table(rows: list[dict[str, Any]], batch_sizes: list[int]) -> str:
    """Markdown table; speed-ups are against the FP cell of the same backend (same run)."""
    head = ["bits", "method", "backend", "kernel"] + [f"ms b{b}" for b in batch_sizes] + \
        [f"x vs fp b{b}" for b in batch_sizes] + ["ms/img", "weight MB", "x smaller"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fp_ms = {r["backend"]: r["metrics"] for r in rows if r["bits"] == "fp"}
    for r in rows:
        m, base = r["metrics"], fp_ms.get(r["backend"], {})
        ms = [f"{m[k]:.2f}" if (k := f"latency_ms_b{b}") in m else "-" for b in batch_sizes]
        speed = [f"{base[k] / m[k]:.2f}" if (k := f"latency_ms_b{b}") in m and k in base else "-"
                 for b in batch_sizes]
        lines.append("| " + " | ".join([r["bits"], r["method"], r["backend"], str(r["kernel"]), *ms, *speed,
                                        f"{m['latency_per_image_ms']:.3f}", f"{m['weight_bytes'] / 1e6:.3f}",
                                        f"{m['compression_vs_fp32']:.2f}"]) + " |")
    return "\n".join(lines)


def cache_summary(rows: list[dict[str, Any]]) -> str:
    """TFMQ's cache-based maintenance vs the same W8A8 model with its TIB, batch 1, per backend."""
    plain = {r["backend"]: r["metrics"]["latency_ms_b1"] for r in rows
             if r["method"] == "rtn" and r["bits"] == "w8a8" and "latency_ms_b1" in r["metrics"]}
    lines = [f"TFMQ cache (TIB skipped), w8a8, batch 1, {r['backend']}: {plain[r['backend']]:.2f} ms -> "
             f"{r['metrics']['latency_ms_b1']:.2f} ms ({plain[r['backend']] / r['metrics']['latency_ms_b1']:.2f}x)"
             for r in rows if r["method"] == "rtn+cache" and r["backend"] in plain]
    return "\n".join(lines) or "TFMQ cache: not measured (tfmq_cache=false, no w8a8, or methods.temporal missing)"


def record_of(cell: Cell, metrics: dict[str, Any], cfg: BenchConfig, init: str, env: dict[str, Any]) -> RunRecord:
    ident = {"kind": "latency", "model": cfg.model, "init": init, "bits": cell.bits, "method": cell.method,
             "backend": cell.backend, "batch_sizes": cell.batch_sizes, "threads": cfg.threads}
    config = {**asdict(cfg), **ident}
    return RunRecord(run_id=run_id(config), model=cfg.model, method=cell.method, bits=cell.bits, kind="latency",
                     status="finished", backend=cell.backend, metrics=metrics,
                     report={"backend": cell.describe, "timings": cell.timings, "init": init},
                     config=config, environment=env)


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Prepare every cell, time them interleaved, print the table, write the records."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fp, init = load_bench_model(cfg)
    fp.net.eval()
    calib = random_calib(fp, cfg.calib_rows, cfg.steps, cfg.seed)
    cells = prepare_cells(fp, calib, cfg)
    time_cells(cells, cfg, calib.schedule[len(calib.schedule) // 2])
    fp_bytes = fp32_weight_bytes(fp.net)
    env = collect_environment()
    store = None if cfg.store == "none" else ResultsStore(cfg.store)
    rows = []
    for cell in cells:
        metrics = summarize(cell, fp_bytes)
        rows.append({"bits": cell.bits, "method": cell.method, "backend": cell.backend,
                     "kernel": cell.describe.get("kernel"), "metrics": metrics})
        if store is not None:
            store.write(record_of(cell, metrics, cfg, init, env))
    print(f"\n{cfg.model} ({init} weights), {cells[0].timings[0]['device'] if cells else '-'}, "
          f"torch threads {torch.get_num_threads()}, CPU {env.get('cpu', {})}")
    print(format_table(rows, cfg.batch_sizes))
    print(cache_summary(rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    keys = "\n".join(f"  {f.name}={_show(getattr(BenchConfig(), f.name))}" for f in fields(BenchConfig))
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"keys (key=value, lists comma-separated) and defaults:\n{keys}")
    parser.add_argument("overrides", nargs="*", help="key=value settings, e.g. model=ddpm_cifar10 init=random")
    run_bench(parse_config(parser.parse_args(argv).overrides))


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


if __name__ == "__main__":
    main()
