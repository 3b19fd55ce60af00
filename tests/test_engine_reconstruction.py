"""BRECQ block reconstruction: beats round-to-nearest, respects frozen / skip, QDrop + LSQ + FSC paths."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine_blocks import tiny_calib, tiny_model
from torch import nn

from harness.models.base import DiffusionModel
from methods.engine.blocks import find_blocks
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantLayer, QuantSpec, act_quantizers, freeze_weights, quant_layers, quantize_layers
from methods.engine.reconstruction import ReconConfig, _qdrop, recon_error, reconstruct_model

torch.set_num_threads(1)

BLOCK = "down_blocks.0.resnets.0"


def _pair(spec: QuantSpec, keep_fp: tuple[str, ...] = ("conv_in",)) -> tuple[DiffusionModel, DiffusionModel]:
    fp = tiny_model("unet")
    q = fp.with_net(copy.deepcopy(fp.net))
    quantize_layers(q.net, spec, keep_fp)
    return q, fp


def _block_error(q: DiffusionModel, fp: DiffusionModel, calib) -> float:
    """Block-output error of BLOCK on FP inputs (conv_in is FP, so the inputs are the same)."""
    got: dict[str, torch.Tensor] = {}
    for tag, model in (("q", q), ("fp", fp)):
        h = model.net.get_submodule(BLOCK).register_forward_hook(lambda _m, _a, o, tag=tag: got.__setitem__(tag, o))
        with torch.no_grad():
            model.net(calib.x, calib.t)
        h.remove()
    return float(recon_error(got["q"], got["fp"]))


def test_reconstruction_beats_round_to_nearest() -> None:
    spec = QuantSpec(3, None)
    calib = tiny_calib(tiny_model("unet"), n=8, steps=4)
    rtn, fp = _pair(spec)
    freeze_weights(rtn.net)
    q, _ = _pair(spec)
    others = [n for n, _ in find_blocks(q.net) if n != BLOCK]
    cfg = ReconConfig(iters=150, batch_size=8, lr=5e-3, capture_batch_size=32)
    stats = reconstruct_model(q, fp, calib, cfg, skip=others)
    assert list(stats["blocks"]) == [BLOCK] and sorted(stats["skipped"]) == sorted(others)
    block = stats["blocks"][BLOCK]
    assert block["loss_after"] < 0.8 * block["loss_before"]
    assert _block_error(q, fp, calib) < 0.8 * _block_error(rtn, fp, calib)
    assert all(layer.w_q is not None for _, layer in quant_layers(q.net.get_submodule(BLOCK)))
    assert all(layer.w_q is None for n, layer in quant_layers(q.net) if not n.startswith(BLOCK))  # skipped


def test_frozen_layers_keep_nearest_rounding() -> None:
    spec = QuantSpec(4, None)
    calib = tiny_calib(tiny_model("unet"), n=2, steps=2)
    q, fp = _pair(spec)
    frozen = [f"{BLOCK}.time_emb_proj", "time_embedding.linear_1"]
    nearest = {n: q.net.get_submodule(n).weight_quantizer(q.net.get_submodule(n).layer.weight).detach() for n in frozen}
    units = [n for n, _ in find_blocks(q.net) if n != BLOCK]
    stats = reconstruct_model(q, fp, calib, ReconConfig(iters=20, batch_size=4), frozen=frozen, skip=units)
    for n in frozen:
        assert torch.equal(q.net.get_submodule(n).w_q, nearest[n])
    assert stats["blocks"][BLOCK]["layers"] == 2  # conv1, conv2: time_emb_proj excluded
    with pytest.raises(KeyError, match="not QuantLayers"):
        reconstruct_model(q, fp, calib, ReconConfig(iters=1), frozen=["nope"])


def test_qdrop_lsq_and_per_timestep_quantizers() -> None:
    spec = QuantSpec(4, 4)
    calib = tiny_calib(tiny_model("unet"), n=4, steps=3)
    q, fp = _pair(spec)
    calibrate_activations(q, calib, batch_size=8, per_timestep=lambda name: name.startswith(BLOCK))
    block_qs = dict(act_quantizers(q.net.get_submodule(BLOCK)))
    assert block_qs and all(qq.per_timestep for qq in block_qs.values())
    scales = {n: qq.scale.detach().clone() for n, qq in act_quantizers(q.net)}
    later = "down_blocks.1.resnets.0"  # its inputs are captured through BLOCK's per-timestep quantizers
    skip = [n for n, _ in find_blocks(q.net) if n not in (BLOCK, later)]
    cfg = ReconConfig(iters=5, batch_size=4, learn_act_scale=True, act_lr=1e-2, qdrop_prob=0.5)
    stats = reconstruct_model(q, fp, calib, cfg, skip=skip)
    assert stats["blocks"][BLOCK]["act_scales"] == 0  # per-timestep ones are not learned
    assert stats["blocks"][later]["act_scales"] > 0
    changed = [n for n, qq in act_quantizers(q.net) if not torch.equal(qq.scale, scales[n])]
    assert changed and all(n.startswith(later) for n in changed)
    assert all(not qq.scale.requires_grad for _, qq in act_quantizers(q.net))
    assert all(layer.w_q is not None for _, layer in quant_layers(q.net.get_submodule(later)))


def test_qdrop_keeps_fp_values_with_the_given_probability() -> None:
    layer = QuantLayer(nn.Linear(64, 4), QuantSpec(8, 2))
    layer.act_quantizer.init_range(torch.tensor([-1.0, 1.0]))
    layer.act_quantizer.mode = "quant"
    x = torch.rand(256, 64) * 2 - 1
    with _qdrop(layer, 0.5):
        dropped = layer.quantize_input(x) == x
    plain = layer.quantize_input(x) == x
    assert abs(float(dropped.double().mean()) - 0.5) < 0.05  # half the elements pass through in FP
    assert float(plain.double().mean()) < 0.05  # outside the context: quantized (2 bits: few exact hits)


def test_config_validation_and_beta_schedule() -> None:
    cfg = ReconConfig(iters=100, warmup=0.2, beta=(20, 2))
    assert cfg.beta_at(10) is None
    assert cfg.beta_at(20) == pytest.approx(20.0)
    assert cfg.beta_at(99) == pytest.approx(2.0, abs=0.3)
    with pytest.raises(ValueError, match="qdrop_prob"):
        ReconConfig(qdrop_prob=1.5)
    assert ReconConfig.from_config({"iters": 5, "act_iters": 7, "foo": 1}, iters_key="act_iters").iters == 7


def test_fp_inputs_feed_blocks_the_fp_models_block_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """BRECQ's asym=False (Q-Diffusion's activation pass): block inputs from the FP model, targets
    from FP; the default takes inputs from the partly quantized model."""
    from methods.engine import reconstruction

    calib = tiny_calib(tiny_model("unet"), n=4, steps=2)
    sources: list[bool] = []
    real = reconstruction._capture

    def spy(model, rows, module, batch_size, want_inputs, by_t):  # noqa: ANN001, ANN202
        if want_inputs:
            sources.append(model is fp)
        return real(model, rows, module, batch_size, want_inputs, by_t)

    monkeypatch.setattr(reconstruction, "_capture", spy)
    monkeypatch.setattr(reconstruction, "FP_CAPTURE_BYTES", 0)  # unit by unit (one pass: test_engine_equivalence)
    for fp_inputs in (False, True):
        q, fp = _pair(QuantSpec(4, None))
        sources.clear()
        cfg = ReconConfig(iters=2, batch_size=2, capture_batch_size=8, fp_inputs=fp_inputs)
        others = [n for n, _ in find_blocks(q.net) if n != BLOCK]
        reconstruct_model(q, fp, calib, cfg, skip=others)
        assert sources == [fp_inputs]
