"""Latency measurement and weight memory at the target bit-width on a tiny random UNet."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DModel

from harness.metrics.latency import benchmark_latency, cpu_info, fp32_weight_bytes, measure_latency, weight_bytes
from harness.models.base import DiffusionModel
from methods.engine.modules import QuantSpec, freeze_weights, quant_layers, quantize_layers

torch.set_num_threads(1)


def tiny_model(num_classes: int | None = None) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=None if num_classes is None else num_classes + 1,
    ).eval()
    return DiffusionModel("tiny", "unet", net, {"num_train_timesteps": 1000}, (1, 8, 8), num_classes=num_classes)


@pytest.mark.parametrize("num_classes", [None, 10])
def test_measure_latency_reports_every_batch_size(num_classes: int | None) -> None:
    out = measure_latency(tiny_model(num_classes), batch_sizes=[1, 4], warmup=1, iters=3)
    assert [r["batch_size"] for r in out["per_batch"]] == [1, 4]
    for row in out["per_batch"]:
        assert 0 < row["ms_min"] <= row["ms_per_call"]
        assert row["ms_per_image"] == pytest.approx(row["ms_per_call"] / row["batch_size"])
        assert row["peak_memory_bytes"] > 10 * 2**20  # at least the interpreter and torch
    assert out["device_type"] == "cpu" and out["memory_kind"] == "process_peak_rss"
    assert out["timestep"] == 500 and out["iters"] == 3
    with pytest.raises(ValueError, match="batch_sizes"):
        measure_latency(tiny_model(), batch_sizes=[0])
    assert all(r["calls"] == 3 and r["iqr_ms"] >= 0 for r in out["per_batch"])
    assert out["torch_threads"] == torch.get_num_threads()


def test_benchmark_latency_uses_blocked_autorange() -> None:
    """The benchmark protocol times blocks of calls until min_run_time and reports median and IQR."""
    out = benchmark_latency(tiny_model(), batch_sizes=[2], warmup=1, min_run_time=0.05)
    row = out["per_batch"][0]
    assert out["timer"] == "blocked_autorange" and out["min_run_time"] == 0.05
    # blocked_autorange stops after one block when a call outlasts min_run_time (a loaded machine):
    # the number of calls is a timing outcome, so only its consistency is asserted.
    assert row["calls"] >= 1 and 0 < row["ms_min"] <= row["ms_per_call"] and row["iqr_ms"] >= 0
    with pytest.raises(ValueError, match="min_run_time"):
        benchmark_latency(tiny_model(), batch_sizes=[1], min_run_time=0)


def test_cpu_info_reads_flags() -> None:
    info = cpu_info()
    assert set(info) == {"model", "avx2", "avx512", "vnni", "amx"}
    assert isinstance(info["avx2"], bool)
    assert all(f.startswith("avx512") for f in info["avx512"]) and all("vnni" in f for f in info["vnni"])


def test_weight_bytes_fp_and_w4() -> None:
    net = tiny_model().net
    fp_bytes = 4 * sum(p.numel() for p in net.parameters()) + 4 * sum(
        b.numel() for b in net.buffers() if b.is_floating_point())
    assert weight_bytes(net) == fp32_weight_bytes(net) == fp_bytes

    q = copy.deepcopy(net)
    quantize_layers(q, QuantSpec(4, 8), keep_fp=["conv_in"])
    expected = fp_bytes
    for _, layer in quant_layers(q):
        w = layer.layer.weight
        expected += -4 * w.numel() + (4 * w.numel() + 7) // 8
        expected += 4 * (layer.weight_quantizer.scale.numel() + layer.weight_quantizer.zero_point.numel())
        for aq in layer.act_quantizers():
            expected += 4 * (aq.scale.numel() + aq.zero_point.numel())
    assert weight_bytes(q) == expected
    assert fp32_weight_bytes(q) == fp_bytes  # quantizer parameters are not model weights
    assert weight_bytes(q) < fp_bytes / 4
    freeze_weights(q)  # the cached quantized weight is the same weight, not counted twice
    assert weight_bytes(q) == expected
