"""Activation range calibration: global vs per-timestep selection, unreached layers, batch invariance."""

from __future__ import annotations

import torch
from test_engine_blocks import tiny_calib, tiny_model
from torch import nn

from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantLayer, QuantSpec, act_quantizers, quantize_layers

torch.set_num_threads(1)


def _quantized(kind: str = "unet"):
    model = tiny_model(kind)
    quantize_layers(model.net, QuantSpec(8, 8))
    return model


def test_global_ranges_do_not_depend_on_batch_size() -> None:
    calib = tiny_calib(tiny_model("unet_cond"), n=3, steps=3)
    scales = []
    for bs in (5, 18):
        model = _quantized("unet_cond")
        calibrate_activations(model, calib, batch_size=bs)
        assert all(q.mode == "quant" and not q.per_timestep for _, q in act_quantizers(model.net))
        scales.append(torch.cat([q.scale.detach() for _, q in act_quantizers(model.net)]))
    assert torch.allclose(scales[0], scales[1])


def test_per_timestep_selection_by_glob_and_predicate() -> None:
    calib = tiny_calib(tiny_model("unet"), n=2, steps=3)
    for selector in (["*time_emb_proj*"], lambda name: "time_emb_proj" in name):
        model = _quantized()
        calibrate_activations(model, calib, batch_size=4, per_timestep=selector)
        chosen = {n for n, q in act_quantizers(model.net) if q.per_timestep}
        assert chosen and all("time_emb_proj" in n for n in chosen)
        assert {n for n, _ in act_quantizers(model.net) if "time_emb_proj" in n} == chosen
        q = next(q for n, q in act_quantizers(model.net) if n in chosen)
        assert sorted(q.ts_keys.tolist()) == sorted(calib.schedule)
        assert all(q.mode == "quant" for _, q in act_quantizers(model.net))


def test_unreached_quantizer_is_switched_off() -> None:
    model = _quantized()
    model.net.unused = QuantLayer(nn.Linear(3, 3), QuantSpec(8, 8))  # never called by forward
    calibrate_activations(model, tiny_calib(tiny_model("unet"), n=1, steps=1), batch_size=4)
    modes = {n: q.mode for n, q in act_quantizers(model.net)}
    assert modes.pop("unused.act_quantizer") == "off"
    assert set(modes.values()) == {"quant"}
