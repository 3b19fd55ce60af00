"""The fast calibration paths compute what the straightforward ones did (issue 15).

Each speed-up is checked against a reference kept here: AdaRound's precomputed grid and floor(w / s)
against recomputing them every forward, the one-pass FP capture against one partial pass per unit,
the unsorted reservoir against the sorted one. Whole reconstructions (Q-Diffusion's two passes,
PTQ4DM's QDrop + LSQ) on a tiny UNet must give bit-identical quantized weights and step sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine_blocks import tiny_calib, tiny_model

from methods.engine import quantizer as quantizer_mod
from methods.engine import reconstruction
from methods.engine.adaround import GAMMA, ZETA, AdaRound
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantLayer, QuantSpec, act_quantizers, quant_layers, quantize_layers, set_act_mode
from methods.engine.quantizer import ActQuantizer
from methods.engine.reconstruction import ReconConfig, reconstruct_model

torch.set_num_threads(1)


def reference_adaround_forward(self: AdaRound, w: torch.Tensor) -> torch.Tensor:
    """AdaRound before issue 15: the grid and floor(w / s) recomputed from the weight every call."""
    layer = next(m for m in _LAYERS if m.weight_rounding is self)
    scale, zp = layer.weight_grid(w)
    offset = (self.alpha >= 0).to(w.dtype) if self.hard else self.soft()
    q = torch.clamp(torch.floor(w / scale) + offset + zp, self.quantizer.qmin, self.quantizer.qmax)
    return (q - zp) * scale


_LAYERS: list[QuantLayer] = []


@pytest.mark.parametrize("split", [False, True])
def test_adaround_forward_and_gradient_match_recomputing_the_grid(split: bool) -> None:
    torch.manual_seed(0)
    layer = QuantLayer(torch.nn.Conv2d(8, 6, 3), QuantSpec(4, None, weight_init="mse"))
    if split:  # Q-Diffusion's split weight grid (needs an activation quantizer to split)
        layer.act_quantizer = ActQuantizer(8)
        layer.enable_split(3, weights=True)
    rounding = AdaRound(layer)
    with torch.no_grad():
        rounding.alpha.add_(torch.randn_like(rounding.alpha))  # away from the init
    _LAYERS[:] = [layer]
    w = layer.layer.weight
    got = rounding(w)
    (gg,) = torch.autograd.grad(got.square().sum(), rounding.alpha)
    want = reference_adaround_forward(rounding, w)
    (gw,) = torch.autograd.grad(want.square().sum(), rounding.alpha)
    assert torch.equal(got, want) and torch.equal(gg, gw)
    h = torch.clamp(torch.sigmoid(rounding.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    assert torch.equal(rounding.soft(), h)


def test_unsorted_reservoir_keeps_the_same_elements(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantizer_mod, "_MAX_OBSERVED", 1000)
    batches = [torch.randn(3000), torch.randn(700), torch.randn(2500)]

    def reservoir() -> torch.Tensor:
        q = ActQuantizer(8, range_init="mse")
        torch.manual_seed(3)
        for b in batches:
            q._reservoir_add(b)
        return q._samples[0]

    fast = reservoir()
    orig_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **k: orig_topk(*a, **{**k, "sorted": True}))
    sorted_ = reservoir()
    assert torch.equal(fast.sort().values, sorted_.sort().values)


def _reconstruct(spec: QuantSpec, cfg: ReconConfig, acts: bool | str, reference: bool,
                 monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A whole reconstruction of the tiny UNet; `reference`: the pre-issue-15 paths."""
    with monkeypatch.context() as m:
        if reference:
            m.setattr(AdaRound, "forward", reference_adaround_forward)
            m.setattr(reconstruction, "FP_CAPTURE_BYTES", 0)  # one partial pass per unit and kind
        torch.manual_seed(0)
        fp = tiny_model("unet")
        calib = tiny_calib(fp, n=6, steps=3)
        q = fp.with_net(copy.deepcopy(fp.net))
        quantize_layers(q.net, spec, ("conv_in",))
        _LAYERS[:] = [layer for _, layer in quant_layers(q.net)]
        if acts:  # "fsc": per-timestep ranges everywhere, so batches hold one timestep each
            calibrate_activations(q, calib, batch_size=8, per_timestep=acts == "fsc")
        else:
            set_act_mode(q.net, "off")
        stats = reconstruct_model(q, fp, calib, cfg)
    out = {f"{n}.w_q": layer.w_q for n, layer in quant_layers(q.net)}
    out.update({f"{n}.scale": aq.scale.detach().clone() for n, aq in act_quantizers(q.net)})
    out["loss_after"] = torch.tensor([b["loss_after"] for b in stats["blocks"].values()])
    return out


@pytest.mark.parametrize(("acts", "cfg"), [
    (False, ReconConfig(iters=12, batch_size=4, capture_batch_size=4)),  # Q-Diffusion's weight pass
    (True, ReconConfig(iters=8, batch_size=4, capture_batch_size=4, learn_weights=False, learn_act_scale=True,
                       fp_inputs=True, act_lr=4e-4)),  # its step-size pass (FP block inputs)
    (True, ReconConfig(iters=8, batch_size=4, capture_batch_size=4, learn_act_scale=True, qdrop_prob=0.5)),  # PTQ4DM
    ("fsc", ReconConfig(iters=8, batch_size=4, capture_batch_size=4, fp_inputs=True)),  # per-timestep batches
])
def test_reconstruction_is_bit_identical_to_the_reference_paths(acts: bool | str, cfg: ReconConfig,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = QuantSpec(4, 8 if acts else None)
    fast = _reconstruct(spec, cfg, acts, reference=False, monkeypatch=monkeypatch)
    ref = _reconstruct(spec, cfg, acts, reference=True, monkeypatch=monkeypatch)
    assert fast.keys() == ref.keys()
    for key in fast:
        if fast[key] is None:
            assert ref[key] is None, key
        else:
            assert torch.equal(fast[key], ref[key]), key


def test_minibatch_rows_keep_the_captured_memory_format() -> None:
    """Block inputs captured after an attention block are channels-last views; a minibatch must keep
    that layout (index_select would not), or the block's convolutions round differently."""
    rows = torch.randn(6, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    inputs = reconstruction._Inputs([reconstruction._Rows(rows)], {})
    (picked,), _ = inputs.select(torch.tensor([4, 1]), torch.device("cpu"))
    assert picked.is_contiguous(memory_format=torch.channels_last) and torch.equal(picked, rows[[4, 1]])
