"""Attention matmul quantizers: exact when off, near-identity at 16 bits, coarse at 4 bits."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention
from test_engine_blocks import tiny_calib, tiny_model

from harness.models.base import denoise
from methods.engine.attention import QuantAttnProcessor, quantize_attention
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantSpec, act_quantizers

torch.set_num_threads(1)


def _outputs(model, calib):
    with torch.no_grad():
        return denoise(model, calib.x, calib.t, calib.cond)


@pytest.mark.parametrize("kind", ["unet", "unet_text", "dit"])
def test_processor_matches_diffusers_when_quantizers_are_off(kind: str) -> None:
    model = tiny_model(kind)
    calib = tiny_calib(model, n=2, steps=2)
    ref = _outputs(model, calib)
    names = quantize_attention(model.net, QuantSpec(8, 8))
    attns = [n for n, m in model.net.named_modules() if isinstance(m, Attention)]
    assert names == attns and names
    assert all(isinstance(model.net.get_submodule(n).processor, QuantAttnProcessor) for n in names)
    assert torch.allclose(_outputs(model, calib), ref, atol=1e-5)


@pytest.mark.parametrize(("bits", "bound"), [(16, 1e-3), (4, None)])
def test_quantized_attention_error_shrinks_with_bits(bits: int, bound: float | None) -> None:
    model = tiny_model("unet_text")
    calib = tiny_calib(model, n=2, steps=2)
    ref = _outputs(model, calib)
    quantize_attention(model.net, QuantSpec(8, bits))
    names = [n for n, _ in act_quantizers(model.net)]
    assert any(n.endswith("softmax_quantizer") for n in names) and any(n.endswith("v_quantizer") for n in names)
    calibrate_activations(model, calib, batch_size=8)
    assert all(q.mode == "quant" for _, q in act_quantizers(model.net))
    rel = float((_outputs(model, calib) - ref).norm() / ref.norm())
    if bound is not None:
        assert rel < bound
    else:
        assert rel > 1e-3  # 4-bit Q/K/V/softmax quantization is visible
    soft = next(q for n, q in act_quantizers(model.net) if n.endswith("softmax_quantizer"))
    assert soft.qmin == 0 and float(soft.zero_point) == 0.0


def test_a32_leaves_attention_alone() -> None:
    model = tiny_model("unet")
    assert quantize_attention(model.net, QuantSpec(4, None)) == []
    assert not list(act_quantizers(model.net))
