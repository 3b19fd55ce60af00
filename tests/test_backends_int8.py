"""The int8 backend computes the fake-quant network with integer kernels: same numbers, real integers."""

from __future__ import annotations

import pytest
import torch
from test_backends_fixtures import SCHEDULE, inputs, quantized_tiny, tiny_model
from torch import nn

from harness.backends import BACKENDS
from harness.backends.int8 import IntegerLayer, integer_layers
from harness.backends.kernels import KERNELS, IntMMKernel, OneDNNKernel, onednn_available
from harness.models.base import denoise
from methods.engine.context import timestep_scope
from methods.engine.modules import QuantLayer, QuantSpec

CPU_KERNELS = ["int_mm"] + (["onednn"] if onednn_available() else [])


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return tiny_model()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)], ids=["w8a8", "w4a8"])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_int8_net_matches_fake(tiny, bits, kernel):
    spec = QuantSpec(*bits)
    qm = quantized_tiny(tiny, spec)
    backend = BACKENDS.get("int8")({"name": "int8", "kernel": kernel})
    exe = backend.prepare(qm, spec)
    x, t, c = inputs(tiny, 3, 500)
    with torch.no_grad():
        fake, real, fp = denoise(qm, x, t, c), denoise(exe, x, t, c), denoise(tiny, x, t, c)
    assert _rel(fake, fp) > 1e-2  # quantization is really on: the check below is not vacuous
    assert _rel(real, fake) < 1e-4  # exact integer maths; only float re-association differs
    facts = backend.describe()
    assert facts["kernel"] == KERNELS[kernel].name
    assert facts["integer_layers"] == len(integer_layers(exe.net)) > 20
    assert facts["weight_only_layers"] == 0
    assert not any(isinstance(m, QuantLayer) for m in exe.net.modules())  # FP weights are gone


def _layer(kind: str, spec: QuantSpec, split: int = 0) -> QuantLayer:
    """One QuantLayer with asymmetric weights and an asymmetric, offset activation range."""
    torch.manual_seed(3)
    inner = nn.Conv2d(12, 16, 3, stride=2, padding=1) if kind == "conv" else nn.Linear(12, 16)
    layer = QuantLayer(inner, spec)
    if split:
        layer.enable_split(split)
    for q, (lo, hi) in zip(layer.act_quantizers(), [(-0.4, 2.5), (-3.0, 0.7)], strict=False):
        q.set_params(*q.params_from_range(torch.tensor([lo]), torch.tensor([hi])))
        q.mode = "quant"
    layer.freeze()
    return layer


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("kind,shape,split", [("conv", (2, 12, 9, 7), 0), ("conv", (2, 12, 9, 7), 5),
                                              ("linear", (2, 5, 12), 0)])
def test_zero_points_and_split_are_exact(kernel, kind, shape, split):
    """Asymmetric weights (zero point per channel) and activations (zero point != 0), padding with
    the activation zero point, and a split-quantized input (two scales) all match the fake layer."""
    spec = QuantSpec(8, 8)
    layer = _layer(kind, spec, split)
    assert bool(layer.weight_quantizer.zero_point.ne(128).any()) and int(layer.act_quantizer.zero_point) != 0
    x = torch.randn(shape) * 1.5
    real = IntegerLayer(layer, KERNELS[kernel])(x)
    with torch.no_grad():
        fake = layer(x)
    assert real.shape == fake.shape
    assert _rel(real, fake) < 1e-5


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_per_timestep_parameters_are_honoured(kernel):
    """FSC: each timestep's (scale, zero point) is used, and an uncalibrated timestep is refused."""
    layer = _layer("conv", QuantSpec(8, 8))
    q = layer.act_quantizer
    q.ts_keys = torch.tensor([100, 900])
    q.ts_scale = torch.tensor([0.004, 0.03])
    q.ts_zero_point = torch.tensor([20.0, 90.0])
    real_layer = IntegerLayer(layer, KERNELS[kernel])
    x = torch.randn(2, 12, 9, 7)
    outs = {}
    for t in (100, 900):
        with timestep_scope(t), torch.no_grad():
            outs[t] = real_layer(x)
            assert _rel(outs[t], layer(x)) < 1e-5
    assert _rel(outs[100], outs[900]) > 0.1  # different parameters really were used
    with timestep_scope(500), pytest.raises(KeyError, match="timestep 500 was not calibrated"):
        real_layer(x)


def test_fsc_network_matches_fake(tiny):
    spec = QuantSpec(4, 8)
    qm = quantized_tiny(tiny, spec, per_timestep=True)
    backend = BACKENDS.get("int8")({"name": "int8"})
    exe = backend.prepare(qm, spec)
    assert backend.describe()["per_timestep_layers"] > 20
    for t in (SCHEDULE[0], SCHEDULE[-1]):
        x, tt, c = inputs(tiny, 2, t)
        with torch.no_grad():
            assert _rel(denoise(exe, x, tt, c), denoise(qm, x, tt, c)) < 1e-4


def test_weight_only_a32(tiny):
    spec = QuantSpec(4, None)
    qm = quantized_tiny(tiny, spec)
    backend = BACKENDS.get("int8")({"name": "int8"})
    exe = backend.prepare(qm, spec)
    x, t, c = inputs(tiny, 2, 500)
    with torch.no_grad():
        assert _rel(denoise(exe, x, t, c), denoise(qm, x, t, c)) < 1e-5
    facts = backend.describe()
    assert facts["integer_layers"] == 0 and facts["weight_only_layers"] > 20
    assert "weight-only" in facts["kernel"]


def test_fp_model_runs_unchanged(tiny):
    backend = BACKENDS.get("int8")({"name": "int8"})
    assert backend.prepare(tiny, None) is tiny
    assert "no quantized layers" in backend.describe()["kernel"]


def test_kernel_choice_and_errors():
    cpu = torch.device("cpu")
    expected = OneDNNKernel if onednn_available() else IntMMKernel
    assert BACKENDS.get("int8")({"kernel": "auto"}) is not None
    from harness.backends.kernels import select_kernel
    assert select_kernel("auto", cpu) is expected
    assert select_kernel("auto", torch.device("cuda")) is IntMMKernel
    with pytest.raises(ValueError, match="accepted: auto, int_mm, onednn"):
        select_kernel("fbgemm", cpu)
    with pytest.raises(ValueError, match="backend.kernal is not a key of backend int8.*Did you mean backend.kernel"):
        BACKENDS.get("int8")({"kernal": "auto"})


def test_off_grid_weight_is_refused():
    layer = _layer("linear", QuantSpec(8, 8))
    layer.w_q = layer.w_q + 0.3 * layer.weight_quantizer.scale.reshape(-1, 1)
    with pytest.raises(ValueError, match="off its quantizer's grid"):
        IntegerLayer(layer, IntMMKernel)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(8, 8), (4, 8)], ids=["w8a8", "w4a8"])
def test_cuda_int_mm_matches_fake(tiny, bits):
    spec = QuantSpec(*bits)
    qm = quantized_tiny(tiny, spec)
    qm.net.cuda()
    backend = BACKENDS.get("int8")({"name": "int8"})
    exe = backend.prepare(qm, spec)
    assert backend.describe()["kernel"] == IntMMKernel.name
    x, t, c = inputs(tiny, 3, 500)
    with torch.no_grad():
        fake, real = denoise(qm, x.cuda(), t.cuda(), c), denoise(exe, x.cuda(), t.cuda(), c)
    assert _rel(real, fake) < 1e-4


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_rounding_ties_go_the_fake_quantizers_way(kernel):
    """Inputs on the midpoints between codes: whichever arithmetic the fake quantizer rounds with,
    the integer layer must pick the same codes (else a flip per tie, amplified downstream)."""
    layer = _layer("linear", QuantSpec(8, 8))
    q = layer.act_quantizer
    s, z = float(q.scale), int(q.zero_point)
    halves = (torch.arange(-z, 255 - z, dtype=torch.float32) + 0.5) * s
    x = halves[torch.randperm(halves.numel(), generator=torch.Generator().manual_seed(0))[:240]].reshape(20, 12)
    with torch.no_grad():
        fake = layer(x)
        real = IntegerLayer(layer, KERNELS[kernel])(x)
    assert _rel(real, fake) < 1e-5
