"""Temporal information-aware reconstruction (TIAR): reconstruct the TIB on its own, first.

Plain BRECQ reconstructs the time-embedding layers inside blocks whose loss depends on x_t, so
these t-only layers overfit to the calibration images. TIAR instead fits the TIB's rounding to its
own outputs, the temporal features, over every (timestep, label) the sampler visits: the loss is
sum_i ||emb_i(t) - emb_i_q(t)||^2. The input is just (t, label), so all of them are cheap to use.
The TIB layers end hard-rounded and are passed to the block reconstruction as frozen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods.engine.modules import QuantLayer
from methods.engine.reconstruction import ReconConfig, optimize_layers, recon_error
from methods.temporal.tib import TIB, iter_schedule, label_axis, temporal_features


def tib_quant_layers(net: nn.Module, tib: TIB) -> dict[str, QuantLayer]:
    """The TIB's layers that are quantized (layers kept in FP are not)."""
    return {n: m for n in tib.layers if isinstance(m := net.get_submodule(n), QuantLayer)}


@torch.no_grad()
def temporal_error(q_net: nn.Module, fp_net: nn.Module, tib: TIB, schedule: list[int], labels: list[int]
                   ) -> dict[str, float]:
    """Per feature, the TIAR loss term (squared error summed over channels, mean over all (t, label))."""
    fp_rows = iter_schedule(fp_net, tib, schedule, labels)
    totals: dict[str, float] = {}
    for (_, q), (_, f) in zip(iter_schedule(q_net, tib, schedule, labels), fp_rows, strict=True):
        for name in tib.features:
            totals[name] = totals.get(name, 0.0) + float(recon_error(q[name], f[name]))
    return {name: v / len(schedule) for name, v in totals.items()}


def _per_timestep(net: nn.Module, layers: dict[str, QuantLayer]) -> bool:
    """Whether the TIB's activation quantizers need one timestep per batch (FSC already applied)."""
    return any(q.mode == "quant" and q.per_timestep for layer in layers.values() for q in layer.act_quantizers())


def reconstruct_tib(q_net: nn.Module, fp_net: nn.Module, tib: TIB, schedule: list[int], labels: list[int],
                    cfg: ReconConfig) -> dict[str, Any]:
    """TIAR: AdaRound the TIB's quantized layers against the FP temporal features, then hard-round.

    Each iteration draws `cfg.batch_size` (timestep, label) pairs from the sampler's schedule x every
    label (one timestep per batch when the TIB already has per-timestep activation quantizers).
    Returns {"layers", "iters", "seconds", "loss_before", "loss_after", "per_feature_after"} and the
    rounding state before hard rounding (`reconstruction.rounding_state`).
    """
    layers = tib_quant_layers(q_net, tib)
    axis = label_axis(tib, labels)
    device = next(q_net.parameters()).device
    t_all = torch.tensor(schedule, dtype=torch.long)
    l_all = None if axis == [None] else torch.tensor(axis, dtype=torch.long)
    single_t = _per_timestep(q_net, layers)
    gen = torch.Generator().manual_seed(cfg.seed)

    def draw() -> tuple[torch.Tensor, torch.Tensor | None]:
        n = cfg.batch_size
        if single_t:
            t = t_all[torch.randint(len(t_all), (1,), generator=gen)].expand(min(n, len(axis)))
            lab = None if l_all is None else l_all[torch.randperm(len(l_all), generator=gen)[: t.numel()]]
        else:
            t = t_all[torch.randint(len(t_all), (n,), generator=gen)]
            lab = None if l_all is None else l_all[torch.randint(len(l_all), (n,), generator=gen)]
        return t.to(device), None if lab is None else lab.to(device)

    def loss_fn() -> torch.Tensor:
        t, lab = draw()
        with torch.no_grad():
            target = temporal_features(fp_net, tib, t, lab)
        pred = temporal_features(q_net, tib, t, lab)
        return sum(recon_error(pred[n], target[n]) for n in tib.features)

    before = temporal_error(q_net, fp_net, tib, schedule, labels)
    frozen_grad = {p: p.requires_grad for p in q_net.parameters()}
    for p in frozen_grad:
        p.requires_grad_(False)
    try:
        result = optimize_layers([m for m in layers.values() if m.w_q is None], [], loss_fn, cfg, desc="TIAR")
    finally:
        for p, flag in frozen_grad.items():
            p.requires_grad_(flag)
    after = temporal_error(q_net, fp_net, tib, schedule, labels)
    return {
        "layers": sorted(layers),
        "iters": result["iters"],
        "seconds": result["seconds"],
        "loss_before": sum(before.values()),
        "loss_after": sum(after.values()),
        "per_feature_after": after,
        **{k: result[k] for k in ("rounding_vars", "soft_fraction", "flipped_fraction") if k in result},
    }
