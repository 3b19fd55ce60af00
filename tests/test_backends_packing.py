"""Weight storage at the target bit-width: int4 packing is lossless and W4 is really ~8x smaller."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.backends import BACKENDS
from harness.backends.int8 import integer_layers
from harness.backends.packing import PackedWeight, pack_int4, unpack_int4
from harness.bench import compose, load_bench_model
from methods.engine.modules import QuantSpec, freeze_weights, quantize_layers


@pytest.mark.parametrize("shape", [(7,), (4, 3, 3, 3), (5, 9)])
def test_int4_pack_round_trip(shape):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    packed = pack_int4(codes)
    n = codes.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, shape), codes)


def test_int4_pack_covers_every_code_and_nibble_order():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(codes), codes.shape), codes)
    assert int(pack_int4(torch.tensor([1, -1], dtype=torch.int8))[0]) == 0xF1  # low nibble first


def test_int4_pack_refuses_out_of_range():
    with pytest.raises(ValueError, match=r"codes in \[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))


@pytest.mark.parametrize("bits,per_byte", [(4, 2), (8, 1)])
def test_packed_weight_bytes(bits, per_byte):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    codes = torch.randint(lo, hi, (16, 8, 3, 3), dtype=torch.int8)
    pw = PackedWeight.pack(codes, bits)
    assert pw.nbytes == codes.numel() // per_byte
    assert torch.equal(pw.unpack(), codes)


def test_w4_weights_are_at_least_7_5x_smaller_on_ddpm_mnist_size_net():
    """The ddpm_mnist architecture (random weights), conv_in/conv_out kept FP as the methods do:
    packed codes + fp32 scale + int8 zero point per channel vs the same layers' fp32 weights."""
    torch.set_num_threads(1)
    fp, _ = load_bench_model(compose(["model=ddpm_mnist", "bench.init=random"]))
    ratios = {}
    for bits in (4, 8):
        net = copy.deepcopy(fp.net)
        quantize_layers(net, QuantSpec(bits, None), ["conv_in", "conv_out"])
        freeze_weights(net)
        backend = BACKENDS.get("int8")({})
        exe = backend.prepare(fp.with_net(net), QuantSpec(bits, None))
        facts = backend.describe()
        layers = integer_layers(exe.net)
        stored = sum(m.weight_packed.numel() * m.weight_packed.element_size() for m in layers)
        assert stored == sum((torch.Size(m.shape).numel() * bits + 7) // 8 for m in layers)
        ratios[bits] = facts["fp32_weight_bytes"] / facts["packed_weight_bytes"]
    assert ratios[4] >= 7.5
    assert 3.8 <= ratios[8] < 4.0
