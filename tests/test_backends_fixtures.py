"""Shared builders for the backend tests (no tests here).

With `exact=True` the quantized tiny UNet has power-of-two scales everywhere and zero biases in its
quantized layers: then every fake-quant product and sum is exact in fp32 (small integers times
powers of two), so the fake model computes bit for bit what an integer kernel computes. A backend
can then be held to ~1e-6 on the whole network, instead of to the chaotic rounding flips that any
1e-7 perturbation sets off in a deep quantized network.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import OmegaConf

from harness.bench import CONF
from harness.calibration import CalibData
from harness.models.base import DiffusionModel
from harness.models.zoo import load_model
from methods.engine.attention import quantize_attention
from methods.engine.calibrate import calibrate_activations
from methods.engine.modules import QuantSpec, act_quantizers, freeze_weights, quant_layers, quantize_layers

SCHEDULE = [900, 500, 100]
KEEP_FP = ["conv_in", "conv_out"]


def tiny_model() -> DiffusionModel:
    return load_model(OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_unet.yaml")))


def pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(s)))


def quantized_tiny(model: DiffusionModel, spec: QuantSpec, per_timestep: bool = False,
                   exact: bool = True) -> DiffusionModel:
    """RTN-style quantization of a copy (asymmetric weights and activations, attention quantized,
    optionally per-timestep activation ranges for every quantizer, FSC scope "all")."""
    torch.manual_seed(0)
    qm = model.with_net(copy.deepcopy(model.net).eval())
    quantize_layers(qm.net, spec, KEEP_FP)
    if spec.act_bits is not None:
        quantize_attention(qm.net, spec)
    if exact:
        for _, layer in quant_layers(qm.net):
            wq = layer.weight_quantizer
            wq.set_params(pow2(wq.scale.data), wq.zero_point)
            if layer.layer.bias is not None:
                layer.layer.bias.data.zero_()
    x = torch.randn(6 * len(SCHEDULE), *model.sample_shape)
    t = torch.tensor(SCHEDULE * 6)
    calib = CalibData(x, t, None, SCHEDULE, 1000, [])
    if spec.act_bits is not None:
        calibrate_activations(qm, calib, 6, per_timestep=per_timestep)
    if exact:
        for _, q in act_quantizers(qm.net):
            q.scale.data = pow2(q.scale.data)
            if q.per_timestep:
                q.ts_scale = pow2(q.ts_scale)
    freeze_weights(qm.net)
    return qm


def inputs(model: DiffusionModel, batch: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, None]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.sample_shape, generator=gen), torch.full((batch,), t), None
