"""Cost metrics: denoiser latency, peak memory, and weight memory at the target bit-width.

Latency is the median wall time of one denoiser call (the unit every sampler repeats) per batch
size, after warm-up, timed by torch.utils.benchmark (CUDA synchronised, IQR reported): a fixed
number of single calls per run (`eval.latency`), blocked_autorange in the latency benchmark. Peak
memory is CUDA's max allocated on a GPU; on a CPU only the process's peak RSS is available (a
high-water mark since the process started, so it includes everything loaded before). The CPU's
vector / matrix extensions are reported because they decide whether integer kernels can be fast at
all (AVX2 without VNNI makes int8 slower than fp32).
"""

from __future__ import annotations

import platform
import resource
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as benchmark
from torch import nn

from harness.models.base import DiffusionModel, denoise
from methods.engine.modules import QuantLayer, quant_layers
from methods.engine.quantizer import UniformQuantizer

FP32_BYTES = 4


def cpu_info() -> dict[str, Any]:
    """CPU model and the SIMD / matrix extensions that matter for int8 (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "model": model,
        "avx2": "avx2" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "vnni": sorted(f for f in flags if "vnni" in f),
        "amx": sorted(f for f in flags if f.startswith("amx")),
    }


def _device_of(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _inputs(model: DiffusionModel, batch: int, timestep: int, device: torch.device,
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = torch.randn(batch, *model.sample_shape, generator=gen).to(device)
    t = torch.full((batch,), timestep, dtype=torch.long, device=device)
    if model.num_classes is not None:
        cond = torch.randint(model.num_classes, (batch,), generator=gen).to(device)
    else:
        cond = model.null_cond(batch, device)
    return x, t, cond


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


Measure = Callable[[benchmark.Timer], benchmark.Measurement]


@torch.no_grad()
def _latency(model: DiffusionModel, batch_sizes: list[int], warmup: int, timestep: int | None,
             measure: Measure, protocol: dict[str, Any]) -> dict[str, Any]:
    """One torch.utils.benchmark measurement per batch size (it synchronises CUDA around calls)."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"<eval.latency.batch_sizes={batch_sizes}> must be a non-empty list of positive integers")
    if warmup < 0:
        raise ValueError(f"<eval.latency.warmup={warmup}> must be >= 0")
    device = _device_of(model.net)
    cuda = device.type == "cuda"
    t = timestep if timestep is not None else int(model.scheduler_config.get("num_train_timesteps", 1000)) // 2
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in batch_sizes:
        x, tt, cond = _inputs(model, b, t, device, gen)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            denoise(model, x, tt, cond)
        # num_threads: Timer defaults to 1 thread; time what the run itself uses.
        timer = benchmark.Timer(stmt="denoise(model, x, t, cond)", num_threads=torch.get_num_threads(),
                                globals={"denoise": denoise, "model": model, "x": x, "t": tt, "cond": cond})
        m = measure(timer)
        peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
        ms = m.median * 1e3
        rows.append({"batch_size": b, "ms_per_call": ms, "ms_per_image": ms / b, "iqr_ms": m.iqr * 1e3,
                     "ms_min": min(m.times) * 1e3, "calls": len(m.times) * m.number_per_run,
                     "peak_memory_bytes": int(peak)})
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu_info()['model']})",
        "device_type": device.type,
        "cpu": cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "timestep": t, "warmup": warmup, **protocol,
        "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss",
        "per_batch": rows,
    }


def measure_latency(model: DiffusionModel, batch_sizes: list[int], warmup: int = 2, iters: int = 5,
                    timestep: int | None = None) -> dict[str, Any]:
    """Median ms per denoiser call (and IQR) over `iters` single timed calls per batch size.

    The per-run protocol of `eval.latency`: a fixed number of calls keeps a run's cost predictable.
    `timestep` defaults to the middle of the training schedule; pass one the sampler visits for
    models with per-timestep quantizers (FSC), which reject uncalibrated timesteps.
    """
    if iters < 1:
        raise ValueError(f"<eval.latency.iters={iters}> must be >= 1")

    def measure(timer: benchmark.Timer) -> benchmark.Measurement:
        return benchmark.Measurement.merge([timer.timeit(1) for _ in range(iters)])[0]

    return _latency(model, batch_sizes, warmup, timestep, measure, {"iters": iters, "timer": "timeit(1) x iters"})


def benchmark_latency(model: DiffusionModel, batch_sizes: list[int], warmup: int = 2, min_run_time: float = 0.5,
                      timestep: int | None = None) -> dict[str, Any]:
    """torch.utils.benchmark's blocked_autorange per batch size (the latency benchmark's protocol)."""
    if min_run_time <= 0:
        raise ValueError(f"<bench.min_run_time={min_run_time}> must be > 0")

    def measure(timer: benchmark.Timer) -> benchmark.Measurement:
        return timer.blocked_autorange(min_run_time=min_run_time)

    return _latency(model, batch_sizes, warmup, timestep, measure,
                    {"min_run_time": min_run_time, "timer": "blocked_autorange"})


def _tensors(net: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    """Every parameter and buffer once (tied tensors counted once), with its owning module."""
    seen: set[int] = set()
    for module in net.modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(t) not in seen:
                seen.add(id(t))
                yield module, name, t


def weight_bytes(net: nn.Module) -> int:
    """Bytes to store `net` at its target bit-width.

    Each QuantLayer weight is packed at `bits * numel / 8` (rounded up per layer) plus its scales and
    zero points (fp32 each); everything else (FP layers, biases, norms, embeddings, activation
    quantizer parameters) at 4 bytes per element. The cached fake-quant weight `w_q` is the same
    weight, not counted twice; integer / bool bookkeeping buffers are not counted.
    """
    packed = {id(q.layer.weight): q.weight_quantizer.bits for _, q in quant_layers(net)}
    cached = {id(q.w_q) for _, q in quant_layers(net) if q.w_q is not None}
    total = 0
    for _, _, t in _tensors(net):
        if id(t) in cached:
            continue
        if id(t) in packed:
            total += (packed[id(t)] * t.numel() + 7) // 8
        elif t.is_floating_point():
            total += FP32_BYTES * t.numel()
    return total


def fp32_weight_bytes(net: nn.Module) -> int:
    """Bytes of the same network stored in fp32, without any quantization parameters."""
    total = 0
    for module, name, t in _tensors(net):
        if isinstance(module, UniformQuantizer) or (isinstance(module, QuantLayer) and name == "w_q"):
            continue
        if t.is_floating_point():
            total += FP32_BYTES * t.numel()
    return total
