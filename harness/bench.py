"""Latency benchmark: FP vs W8A8 vs W4A8 on every backend, for one model, measured side by side.

    python -m harness.bench model=ddpm_mnist
    python -m harness.bench model=ddpm_cifar10 bench.init=random bench.batch_sizes=[1,16]
    python -m harness.bench model=tiny_unet bench.backends=[fake] bench.bits=[fp,w8a8] bench.store=none
    python -m harness.bench --cfg job      # the composed config: every key and its default

The config is conf/bench.yaml composed by Hydra, as run.py composes conf/config.yaml: `model=` and
`method=` are the same config groups, so a model yaml means the same thing to both. Quantization is
the `method` group (RTN by default) on random calibration inputs: weight values do not change speed,
so this times exactly what a calibrated run would execute. Each (bits, backend) cell is prepared
once, then all cells are timed in `rounds` interleaved rounds, each a torch.utils.benchmark
blocked_autorange measurement (median and IQR); the median over rounds is reported with the largest
IQR, so a load spike on a shared machine hits every cell alike and shows. With `tfmq_cache=true`, the
W8A8 model is also timed with TFMQ's cache-based maintenance (FP temporal features served from a
per-timestep quantized cache, the TIB skipped) at batch 1, the setting where skipping the TIB shows.
One record of kind "latency" per cell goes to the results store (`bench.store=none` to skip).
"""

from __future__ import annotations

import copy
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from harness.backends import BACKENDS
from harness.calibration import CalibData
from harness.environment import collect_environment, machine_load, under_load
from harness.metrics.latency import benchmark_latency, fp32_weight_bytes, weight_bytes
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
INITS = ("auto", "pretrained", "random")


@dataclass
class BenchConfig:
    """The `bench` node of conf/bench.yaml (Hydra rejects unknown keys before this is built)."""

    init: str = "auto"
    bits: list[str] = field(default_factory=lambda: ["fp", "w8a8", "w4a8"])
    backends: list[str] = field(default_factory=lambda: ["fake", "int8", "openvino"])
    int8_kernels: list[str] = field(default_factory=lambda: ["onednn", "int_mm"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 2
    min_run_time: float = 0.5
    rounds: int = 3
    threads: int = 0
    calib_rows: int = 32
    steps: int = 10
    tfmq_cache: bool = True
    store: str = "results/store"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"<bench.init={self.init}> must be one of {', '.join(INITS)}")
        for tag in self.bits:
            if tag != "fp" and not BITS_RE.match(tag):
                raise ValueError(f"<bench.bits={tag}> must be fp or wXaY (e.g. w8a8, w4a8, w4a32)")
        for name in self.backends:
            BACKENDS.get(name)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"<bench.batch_sizes={self.batch_sizes}> must be a non-empty list of positive integers")
        if self.min_run_time <= 0 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("<bench.min_run_time> must be > 0, <bench.rounds> >= 1 and <bench.warmup> >= 0")


@dataclass
class Bench:
    """A composed benchmark: the typed `bench` node plus the resolved model and method groups."""

    settings: BenchConfig
    model: dict[str, Any]
    method: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Bench:
        raw = OmegaConf.to_container(cfg, resolve=True)
        return cls(BenchConfig(**raw["bench"]), raw["model"], raw["method"])


def compose(overrides: list[str]) -> Bench:
    """conf/bench.yaml composed with Hydra's compose API (tests and scripts; the CLI uses @hydra.main)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return Bench.from_config(hydra_compose(config_name="bench", overrides=overrides))


def spec_of(tag: str) -> QuantSpec | None:
    if tag == "fp":
        return None
    w, a = (int(v) for v in BITS_RE.match(tag).groups())
    return QuantSpec(w, None if a == 32 else a)


def load_bench_model(bench: Bench) -> tuple[DiffusionModel, str]:
    """The composed model; with init=auto, random weights (same architecture) if its own are missing."""
    mcfg, init = dict(bench.model), bench.settings.init
    if init in ("auto", "pretrained"):
        try:
            return load_model(mcfg), str(mcfg.get("init", "pretrained"))
        except (OSError, ValueError) as err:
            if init == "pretrained":
                raise
            print(f"[bench] {mcfg['name']}: no pretrained weights ({type(err).__name__}); using random init",
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


def quantize(model: DiffusionModel, calib: CalibData, tag: str, bench: Bench) -> DiffusionModel:
    """The composed method at `tag` (quick recipe, `calib_rows` calibration rows); FP as is."""
    spec = spec_of(tag)
    if spec is None:
        return model
    mcfg = copy.deepcopy(bench.method)
    rows = bench.settings.calib_rows
    mcfg.setdefault("recipes", {}).setdefault("quick", {}).update(calib_rows=rows, batch_size=rows)
    return METHODS.get(mcfg["name"])(mcfg, "quick").quantize(model, calib, spec).model


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


def prepare_cells(fp: DiffusionModel, calib: CalibData, bench: Bench) -> list[Cell]:
    cfg, method = bench.settings, bench.method["name"]
    cells: list[Cell] = []
    for tag in cfg.bits:
        qmodel = quantize(fp, calib, tag, bench)
        spec = spec_of(tag)
        variants: list[tuple[str, DiffusionModel, list[int]]] = [("fp" if spec is None else method, qmodel,
                                                                 cfg.batch_sizes)]
        if cfg.tfmq_cache and spec is not None and spec.act_bits is not None and tag == "w8a8":
            cached = with_feature_cache(fp, qmodel, calib, spec)
            if cached is not None:
                variants.append((f"{method}+cache", cached, [1]))
        for name, model, batches in variants:
            for backend, bcfg in backend_configs(cfg):
                be = BACKENDS.get(bcfg["name"])(bcfg)
                print(f"[bench] preparing {tag} {name} on {backend}", file=sys.stderr)
                exe = be.prepare(model, spec)
                cells.append(Cell(tag, backend, name, exe, model, be.describe(), batches))
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
            cell.timings.append(benchmark_latency(cell.exe, cell.batch_sizes, cfg.warmup, cfg.min_run_time, timestep))


def summarize(cell: Cell, fp_bytes: int) -> dict[str, Any]:
    """Median over rounds of each batch size's blocked_autorange median, the largest IQR, memory facts."""
    out: dict[str, Any] = {}
    for i, b in enumerate(cell.batch_sizes):
        per_round = [t["per_batch"][i] for t in cell.timings]
        ms = statistics.median(p["ms_per_call"] for p in per_round)
        out[f"latency_ms_b{b}"] = ms
        out[f"latency_iqr_ms_b{b}"] = max(p["iqr_ms"] for p in per_round)
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
             if r["bits"] == "w8a8" and "+cache" not in r["method"] and "latency_ms_b1" in r["metrics"]}
    lines = [f"TFMQ cache (TIB skipped), w8a8, batch 1, {r['backend']}: {plain[r['backend']]:.2f} ms -> "
             f"{r['metrics']['latency_ms_b1']:.2f} ms ({plain[r['backend']] / r['metrics']['latency_ms_b1']:.2f}x)"
             for r in rows if r["method"].endswith("+cache") and r["backend"] in plain]
    return "\n".join(lines) or "TFMQ cache: not measured (tfmq_cache=false, no w8a8, or methods.temporal missing)"


def record_of(cell: Cell, metrics: dict[str, Any], bench: Bench, init: str, env: dict[str, Any]) -> RunRecord:
    cfg, model = bench.settings, bench.model["name"]
    ident = {"kind": "latency", "model": model, "init": init, "bits": cell.bits, "method": cell.method,
             "backend": cell.backend, "batch_sizes": cell.batch_sizes, "threads": cfg.threads}
    config = {**asdict(cfg), **ident, "model_config": bench.model, "method_config": bench.method}
    return RunRecord(run_id=run_id(config), model=model, method=cell.method, bits=cell.bits, kind="latency",
                     status="finished", backend=cell.backend, metrics=metrics,
                     report={"backend": cell.describe, "timings": cell.timings, "init": init},
                     config=config, environment=env)


def run_bench(bench: Bench, seed: int = 0) -> list[dict[str, Any]]:
    """Prepare every cell, time them interleaved, print the table, write the records."""
    cfg = bench.settings
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fp, init = load_bench_model(bench)
    fp.net.eval()
    calib = random_calib(fp, cfg.calib_rows, cfg.steps, seed)
    cells = prepare_cells(fp, calib, bench)
    load = {"start": machine_load()}  # contention beside the timings: the latency table flags it
    time_cells(cells, cfg, calib.schedule[len(calib.schedule) // 2])
    load["end"] = machine_load()
    fp_bytes = fp32_weight_bytes(fp.net)
    env = {**collect_environment(), "load": load, "under_load": under_load(load)}
    store = None if cfg.store == "none" else ResultsStore(Path(cfg.store))
    rows = []
    for cell in cells:
        metrics = summarize(cell, fp_bytes)
        rows.append({"bits": cell.bits, "method": cell.method, "backend": cell.backend,
                     "kernel": cell.describe.get("kernel"), "metrics": metrics})
        if store is not None:
            store.write(record_of(cell, metrics, bench, init, env))
    print(f"\n{bench.model['name']} ({init} weights), {cells[0].timings[0]['device'] if cells else '-'}, "
          f"torch threads {torch.get_num_threads()}, CPU {env.get('cpu', {})}")
    print(format_table(rows, cfg.batch_sizes))
    print(cache_summary(rows))
    print(f"records: {store.root if store is not None else 'not written (bench.store=none)'}")
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_bench(Bench.from_config(cfg), seed=int(cfg.seed))


if __name__ == "__main__":
    main()
