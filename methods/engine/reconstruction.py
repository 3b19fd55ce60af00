"""BRECQ block reconstruction: fit each block's rounding (and activation step sizes) to FP outputs.

Blocks (see blocks.py) are reconstructed one at a time in execution order. A block's inputs are
captured from the partly quantized model (every earlier block already hard-rounded), its targets
are the FP model's block outputs on the FP trajectory ("asym" reconstruction, so later blocks learn
to absorb earlier blocks' error). Inputs are captured block by block (forward hooks stop the pass
right after the block), never the whole network's activations at once.

The objective is BRECQ's: squared error summed over channels, averaged over batch and positions,
plus lambda * AdaRound regularizer once the warm-up is over, with beta annealed linearly 20 -> 2.
Options: LSQ-style learning of activation step sizes, and QDrop (each activation quantizer in the
block passes the FP value instead of the quantized one, elementwise, with probability p).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.calibration import CalibData
from harness.models.base import DiffusionModel, denoise
from harness.progress import progress_bar
from methods.engine import events, phases
from methods.engine.adaround import AdaRound, freeze_layer
from methods.engine.blocks import find_blocks
from methods.engine.calibrate import batch_inputs, net_device
from methods.engine.context import install_timestep_context, timestep_scope
from methods.engine.modules import QuantLayer, act_quantizers, quant_layers


@dataclass
class ReconConfig:
    """Knobs of block reconstruction (defaults: BRECQ / Q-Diffusion values, except `iters`).

    `lr` is AdaRound's Adam rate, `act_lr` the step-size rate (cosine-annealed, as in BRECQ);
    `warmup` is the fraction of iterations without rounding regularizer; `beta` the (start, end)
    of its temperature. `learn_weights=False` reconstructs activation step sizes only.
    `n_samples` caps the calibration rows used (None = all); `capture_batch_size` is the batch of
    the capture passes; `eval_rows` the rows on which loss before/after is reported. `fp_inputs`
    feeds each block the FP model's block inputs instead of the partly quantized model's (BRECQ's
    asym=False; Q-Diffusion's activation step-size pass does this).
    """

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3
    act_lr: float = 4e-5
    weight_lambda: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    learn_act_scale: bool = False
    qdrop_prob: float = 0.0
    n_samples: int | None = None
    learn_weights: bool = True
    capture_batch_size: int = 64
    eval_rows: int = 256
    fp_inputs: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.beta = (float(self.beta[0]), float(self.beta[1]))
        self.lr, self.act_lr, self.weight_lambda = float(self.lr), float(self.act_lr), float(self.weight_lambda)
        for key in ("iters", "batch_size", "capture_batch_size", "eval_rows"):
            v = getattr(self, key)
            low = 0 if key == "iters" else 1
            if not isinstance(v, int) or v < low:
                raise ValueError(f"<recon.{key}={v}> must be an integer >= {low}")
        if not 0.0 <= self.qdrop_prob < 1.0:
            raise ValueError(f"<recon.qdrop_prob={self.qdrop_prob}> must be in [0, 1) (0 = QDrop off)")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"<recon.warmup={self.warmup}> must be a fraction in [0, 1)")
        if self.n_samples is not None and self.n_samples < 1:
            raise ValueError(f"<recon.n_samples={self.n_samples}> must be a positive integer or null (all rows)")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], iters_key: str = "iters", **overrides: Any) -> ReconConfig:
        """From a method's (recipe-merged) config dict; unknown keys are ignored, missing ones default.

        `iters_key` names the iteration count to use (e.g. Q-Diffusion's second pass, `act_iters`)."""
        known = {f for f in cls.__dataclass_fields__ if f != "iters"}
        values = {k: cfg[k] for k in known if k in cfg}
        if iters_key in cfg:
            values["iters"] = cfg[iters_key]
        return cls(**{**values, **overrides})

    def beta_at(self, it: int) -> float | None:
        """Regularizer temperature at iteration `it`, None during warm-up (no regularizer)."""
        start = int(self.warmup * self.iters)
        if it < start:
            return None
        rel = (it - start) / max(1, self.iters - start)
        b0, b1 = self.beta
        return b1 + (b0 - b1) * max(0.0, 1.0 - rel)


def recon_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over dim 1 (channels / features), averaged over the rest (BRECQ)."""
    err = (pred - target).pow(2)
    return err.sum(1).mean() if err.dim() > 1 else err.mean()


# -- the optimisation loop (also used directly by TFMQ's temporal reconstruction) ---------------------
def optimize_layers(
    layers: Sequence[QuantLayer],
    act_params: Sequence[nn.Parameter],
    loss_fn: Callable[[], torch.Tensor],
    cfg: ReconConfig,
    desc: str = "reconstruct",
) -> dict[str, float]:
    """Learn AdaRound for `layers` and step sizes `act_params` against `loss_fn`, then hard-round.

    `loss_fn()` draws its own minibatch and returns the reconstruction loss (no regularizer). At the
    end every layer is switched to hard rounding and frozen (its quantized weight cached). Returns
    {"iters", "seconds", "final_loss"}.
    """
    start = time.perf_counter()
    roundings = [AdaRound(layer) for layer in layers]
    groups: list[dict[str, Any]] = []
    if roundings:
        groups.append({"params": [r.alpha for r in roundings], "lr": cfg.lr})
    if act_params:
        for p in act_params:
            p.requires_grad_(True)
        groups.append({"params": list(act_params), "lr": cfg.act_lr, "act": True})
    final = float("nan")
    iters = cfg.iters if groups else 0
    try:
        opt = torch.optim.Adam(groups) if groups else None
        bar = progress_bar(range(iters), desc=desc, leave=False)
        for it in bar:
            with phases.phase(phases.FORWARD):
                rec = loss_fn()
            beta = cfg.beta_at(it)
            loss = rec
            if beta is not None and roundings:
                with phases.phase(phases.REGULARIZER):
                    loss = rec + cfg.weight_lambda * sum(r.regularizer(beta) for r in roundings)
            with phases.phase(phases.BACKWARD):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            with phases.phase(phases.OPTIMIZER):
                opt.step()
                for g in opt.param_groups:
                    if g.get("act"):
                        g["lr"] = 0.5 * cfg.act_lr * (1 + math.cos(math.pi * (it + 1) / iters))
                        for p in g["params"]:
                            p.data.clamp_(min=1e-8)
            if it % 50 == 0 or it == iters - 1:  # reading the loss syncs a GPU: not every step
                final = float(rec.detach())
                bar.set_postfix(rec=f"{final:.4g}")
                events.emit("recon_iter", block=desc, iter=it, loss=final, weights=len(roundings), acts=len(act_params))
    finally:
        for p in act_params:
            p.requires_grad_(False)
            p.grad = None
        rounding = rounding_state(roundings)
        for layer in layers:
            freeze_layer(layer)
    return {"iters": iters, "seconds": time.perf_counter() - start, "final_loss": final, **rounding}


@torch.no_grad()
def rounding_state(roundings: Sequence[AdaRound]) -> dict[str, float]:
    """Before hard rounding: how many rounding variables h are still strictly between 0 and 1 (the
    regularizer had not decided them, so hard rounding changes the optimised weight), and how many
    end up away from round-to-nearest. Keys: rounding_vars, soft_fraction, flipped_fraction."""
    total = sum(r.alpha.numel() for r in roundings)
    if total == 0:
        return {"rounding_vars": 0}
    soft = sum(int(((h := r.soft()) > 0).logical_and(h < 1).sum()) for r in roundings)
    flipped = sum(int(((r.alpha >= 0).float() != r.nearest()).sum()) for r in roundings)
    return {"rounding_vars": total, "soft_fraction": soft / total, "flipped_fraction": flipped / total}


# -- capturing block inputs and outputs ------------------------------------------------------------
class _Stop(Exception):
    """Raised by a capture hook to end the forward pass right after the block of interest."""


def _as_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return _as_tensor(out[0])
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot read a tensor from block output of type {type(out).__name__}")


@dataclass
class _Inputs:
    """A block's captured call arguments; batched tensors are concatenated over calibration rows."""

    args: list[Any]
    kwargs: dict[str, Any]

    def select(self, idx: torch.Tensor, device: torch.device) -> tuple[list[Any], dict[str, Any]]:
        def pick(v: Any) -> Any:
            # Advanced indexing keeps the captured memory format (channels-last after an attention
            # block); index_select would not, and convolutions then round differently.
            return v.data[idx].to(device) if isinstance(v, _Rows) else v

        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


@dataclass
class _Rows:
    """A captured tensor whose first dimension runs over calibration rows (kept on the CPU)."""

    data: torch.Tensor


def _collate(values: list[Any], rows: list[int]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == rows[0]:
        return _Rows(torch.cat([v.detach().cpu() for v in values]))
    if isinstance(first, torch.Tensor):
        return first.detach()
    return first


@torch.no_grad()
def _capture(
    model: DiffusionModel, rows: CalibData, module: nn.Module, batch_size: int, want_inputs: bool, by_t: bool
) -> _Inputs | torch.Tensor:
    """Run `rows` through `model` until `module` has run once per batch; keep its inputs or output.

    `by_t` feeds one timestep per batch (needed once per-timestep quantizers exist); `rows` must then
    be grouped by timestep in schedule order, so that the captured rows keep the order of `rows`."""
    device = net_device(model.net)
    got: list[tuple[tuple, dict, torch.Tensor]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        got.append((args, kwargs, _as_tensor(out).detach().cpu()))
        raise _Stop

    handle = module.register_forward_hook(hook, with_kwargs=True)
    sizes: list[int] = []
    try:
        for batch in rows.batches(batch_size, by_timestep=by_t):
            try:
                denoise(model, *batch_inputs(batch, device))
            except _Stop:
                pass
            if len(got) != len(sizes) + 1:
                raise RuntimeError("block was not called by the denoiser; it cannot be reconstructed")
            sizes.append(len(batch))
    finally:
        handle.remove()
    if not want_inputs:
        return torch.cat([o for _, _, o in got])
    n_args = len(got[0][0])
    args = [_collate([g[0][i] for g in got], sizes) for i in range(n_args)]
    kwargs = {k: _collate([g[1][k] for g in got], sizes) for k in got[0][1]}
    return _Inputs(args, kwargs)


# The FP model's block inputs / outputs of all units are captured in one pass when they fit in this
# many bytes (ddpm_mnist, quick recipe: about 0.3 GB); beyond it, unit by unit as before.
FP_CAPTURE_BYTES = 2 << 30


def _clone_value(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


class _FpCapture:
    """The FP model's inputs and outputs of every unit of one reconstruction pass, captured on first
    use in a single forward pass over the rows (one partial pass per unit and kind costs a quadratic
    number of block evaluations). The tensors are the ones the per-unit capture would keep: the same
    batches, the first call of each unit per batch, cloned at the hook because the pass goes on.
    When they would exceed `budget` bytes (estimated after the first batch), `get` returns None and
    the caller captures unit by unit."""

    def __init__(self, model: DiffusionModel, rows: CalibData, names: list[str], batch_size: int, by_t: bool,
                 want_inputs: bool, budget: int | None = None) -> None:
        self.model, self.rows, self.names, self.batch_size, self.by_t = model, rows, names, batch_size, by_t
        self.want_inputs, self.budget = want_inputs, FP_CAPTURE_BYTES if budget is None else budget
        self._store: dict[str, tuple[_Inputs | None, torch.Tensor]] | None = None
        self._tried = False

    def get(self, name: str) -> tuple[_Inputs | None, torch.Tensor] | None:
        if not self._tried:
            self._tried = True
            self._store = self._capture_all()
        return None if self._store is None else self._store.get(name)

    @torch.no_grad()
    def _capture_all(self) -> dict[str, tuple[_Inputs | None, torch.Tensor]] | None:
        device = net_device(self.model.net)
        got: dict[str, list[tuple[tuple, dict, torch.Tensor]]] = {n: [] for n in self.names}
        seen: set[str] = set()

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
                if name in seen:  # the per-unit capture stops at the first call
                    return
                seen.add(name)
                keep_args = tuple(_clone_value(a) for a in args) if self.want_inputs else ()
                keep_kwargs = {k: _clone_value(v) for k, v in kwargs.items()} if self.want_inputs else {}
                got[name].append((keep_args, keep_kwargs, _as_tensor(out).detach().clone().cpu()))
            return hook

        handles = [self.model.net.get_submodule(n).register_forward_hook(make_hook(n), with_kwargs=True)
                   for n in self.names]
        sizes: list[int] = []
        try:
            for batch in self.rows.batches(self.batch_size, by_timestep=self.by_t):
                seen.clear()
                denoise(self.model, *batch_inputs(batch, device))
                sizes.append(len(batch))
                if len(sizes) == 1 and _bytes(got) * len(self.rows) / len(batch) > self.budget:
                    return None
        finally:
            for h in handles:
                h.remove()
        store: dict[str, tuple[_Inputs | None, torch.Tensor]] = {}
        for name, calls in got.items():
            if len(calls) != len(sizes):  # not called in every batch: the per-unit capture says why
                continue
            inputs = None
            if self.want_inputs:
                args = [_collate([c[0][i] for c in calls], sizes) for i in range(len(calls[0][0]))]
                inputs = _Inputs(args, {k: _collate([c[1][k] for c in calls], sizes) for k in calls[0][1]})
            store[name] = (inputs, torch.cat([c[2] for c in calls]))
        return store


def _bytes(got: dict[str, list[tuple[tuple, dict, torch.Tensor]]]) -> int:
    total = 0
    for calls in got.values():
        for args, kwargs, out in calls:
            for v in (*args, *kwargs.values(), out):
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


# -- minibatches ----------------------------------------------------------------------------------
def _train_indices(t: torch.Tensor, bs: int, single_t: bool, gen: torch.Generator) -> torch.Tensor:
    """A random minibatch; with per-timestep quantizers in the block, all rows share one timestep."""
    n = t.numel()
    if not single_t:
        return torch.randperm(n, generator=gen)[:bs]
    anchor = t[torch.randint(n, (1,), generator=gen)]
    pool = torch.nonzero(t == anchor).flatten()
    return pool[torch.randperm(pool.numel(), generator=gen)[:bs]]


def _eval_indices(t: torch.Tensor, n_rows: int, bs: int, single_t: bool) -> list[torch.Tensor]:
    """Batches over `n_rows` rows spread evenly over all rows (rows may be grouped by timestep)."""
    rows = torch.linspace(0, t.numel() - 1, min(n_rows, t.numel())).round().long().unique()
    groups = [rows[t[rows] == v] for v in torch.unique(t[rows])] if single_t else [rows]
    return [g[i : i + bs] for g in groups for i in range(0, g.numel(), bs)]


@contextmanager
def _qdrop(module: nn.Module, prob: float) -> Iterator[None]:
    """Inside, each quantizing activation quantizer of `module` keeps the FP value with prob `prob`."""
    handles = []
    if prob > 0:

        def hook(q: nn.Module, inp: tuple, out: torch.Tensor) -> torch.Tensor:
            if q.mode != "quant":
                return out
            return torch.where(torch.rand_like(out) < prob, inp[0], out)

        handles = [q.register_forward_hook(hook) for _, q in act_quantizers(module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- the model-level driver -------------------------------------------------------------------------
def _unit_layers(name: str, unit: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(f"{name}.{rel}" if rel else name, layer) for rel, layer in quant_layers(unit)]


def _freeze_named(net: nn.Module, names: Collection[str]) -> None:
    layers = dict(quant_layers(net))
    missing = sorted(set(names) - set(layers))
    if missing:
        raise KeyError(
            f"frozen layers {missing} are not QuantLayers of the network; accepted e.g. {sorted(layers)[:5]}"
        )
    for n in names:
        freeze_layer(layers[n])


def _subsample(calib: CalibData, n: int | None, gen: torch.Generator) -> CalibData:
    if n is None or n >= len(calib):
        return calib
    return calib.subset(torch.randperm(len(calib), generator=gen)[:n].sort().values)


def _grouped_by_timestep(rows: CalibData) -> CalibData:
    """Rows reordered by their timestep's position in the schedule (the order of `batches(by_timestep)`)."""
    position = {t: i for i, t in enumerate(rows.schedule)}
    unknown = sorted(set(rows.t.tolist()) - set(position))
    if unknown:
        raise ValueError(f"calibration rows at timesteps {unknown} are not in the schedule {rows.schedule}")
    keys = torch.tensor([position[t] for t in rows.t.tolist()])
    return rows.subset(torch.sort(keys, stable=True).indices)


def _cuda_ids(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def reconstruct_model(
    q_model: DiffusionModel,
    fp_model: DiffusionModel,
    calib: CalibData,
    cfg: ReconConfig,
    frozen: Collection[str] = (),
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """Reconstruct every block of `q_model.net` (in place) against `fp_model.net`, in execution order.

    `frozen`: QuantLayer names hard-rounded up front and never optimised (nor regularised).
    `skip`: unit names (see `find_blocks`) left as they are. Each reconstructed unit ends hard-rounded
    and frozen. Returns {"blocks": {name: {loss_before, loss_after, iters, seconds, layers}},
    "skipped": [...], "order": [...], "seconds": total}.
    """
    start = time.perf_counter()
    net, device = q_model.net, net_device(q_model.net)
    install_timestep_context(net)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = _subsample(calib, cfg.n_samples, gen)
    if len(rows) == 0:
        raise ValueError("reconstruction needs calibration rows; got an empty CalibData")
    _freeze_named(net, frozen)
    by_t = any(q.per_timestep for _, q in act_quantizers(net))
    if by_t:
        rows = _grouped_by_timestep(rows)
    first = rows.subset(torch.arange(1))
    units = find_blocks(net, order_by=lambda: denoise(q_model, *batch_inputs(first, device)))
    stats: dict[str, Any] = {"blocks": {}, "skipped": [], "order": [n for n, _ in units]}
    saved_grad = {p: p.requires_grad for p in net.parameters()}
    for p in saved_grad:
        p.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=_cuda_ids(device)):
            torch.manual_seed(cfg.seed)
            fp = _FpCapture(fp_model, rows, [n for n, _ in units if n not in skip], cfg.capture_batch_size, by_t,
                            want_inputs=cfg.fp_inputs)
            for name, unit in progress_bar(units, desc="block reconstruction", unit="block"):
                if name in skip:
                    stats["skipped"].append(name)
                    continue
                result = _reconstruct_unit(q_model, fp_model, rows, name, unit, cfg, set(frozen), gen, by_t, fp)
                if result is None:
                    stats["skipped"].append(name)
                else:
                    stats["blocks"][name] = result
    finally:
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
    stats["seconds"] = time.perf_counter() - start
    stats["rounding"] = merge_rounding(stats["blocks"].values())
    return stats


def _reconstruct_unit(
    q_model: DiffusionModel,
    fp_model: DiffusionModel,
    rows: CalibData,
    name: str,
    unit: nn.Module,
    cfg: ReconConfig,
    frozen: set[str],
    gen: torch.Generator,
    by_t: bool,
    fp: _FpCapture,
) -> dict[str, float] | None:
    """One unit: capture, measure, optimise, measure. None when it has nothing to optimise."""
    start = time.perf_counter()
    layers = [
        layer for n, layer in _unit_layers(name, unit) if cfg.learn_weights and n not in frozen and layer.w_q is None
    ]
    quantizers = [q for _, q in act_quantizers(unit) if q.mode == "quant"]
    act_params = [q.scale for q in quantizers if not q.per_timestep] if cfg.learn_act_scale else []
    if not layers and not act_params:
        return None
    device = net_device(q_model.net)
    source, module = (fp_model, fp_model.net.get_submodule(name)) if cfg.fp_inputs else (q_model, unit)
    with phases.phase(phases.CAPTURE):
        fp_inputs, target = fp.get(name) or (None, None)
        if target is None:
            target = _capture(fp_model, rows, fp_model.net.get_submodule(name), cfg.capture_batch_size, False, by_t)
        inputs = fp_inputs or _capture(source, rows, module, cfg.capture_batch_size, True, by_t)
    t_rows = rows.t
    single_t = any(q.per_timestep for q in quantizers)

    def run(idx: torch.Tensor) -> torch.Tensor:
        args, kwargs = inputs.select(idx, device)
        with timestep_scope(t_rows[idx]):
            return _as_tensor(unit(*args, **kwargs))

    def evaluate() -> float:
        with torch.no_grad(), phases.phase(phases.EVAL):
            parts = _eval_indices(t_rows, cfg.eval_rows, cfg.capture_batch_size, single_t)
            total = sum(float(recon_error(run(idx), target[idx].to(device))) * idx.numel()
                        for idx in parts)
            return total / sum(idx.numel() for idx in parts)

    def loss_fn() -> torch.Tensor:
        idx = _train_indices(t_rows, cfg.batch_size, single_t, gen)
        with _qdrop(unit, cfg.qdrop_prob):
            return recon_error(run(idx), target[idx].to(device))

    before = evaluate()
    result = optimize_layers(layers, act_params, loss_fn, cfg, desc=name)
    after = evaluate()
    events.emit("recon_block", block=name, before=before, after=after, weights=len(layers), acts=len(act_params))
    return {
        "loss_before": before,
        "loss_after": after,
        "iters": result["iters"],
        "seconds": time.perf_counter() - start,
        "layers": len(layers),
        "act_scales": len(act_params),
        **{k: result[k] for k in ("rounding_vars", "soft_fraction", "flipped_fraction") if k in result},
    }


def merge_rounding(parts: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The rounding state of several optimisations (blocks, TIAR) as one: counts summed, fractions
    weighted by each part's number of rounding variables."""
    parts = [p for p in parts if p.get("rounding_vars")]
    total = sum(p["rounding_vars"] for p in parts)
    if not total:
        return {"rounding_vars": 0}
    return {"rounding_vars": total,
            **{k: sum(p[k] * p["rounding_vars"] for p in parts) / total for k in ("soft_fraction", "flipped_fraction")}}
