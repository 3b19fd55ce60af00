"""Temporal-feature error, trajectory error and PSNR on tiny random diffusers models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel

from harness.metrics.temporal import (
    PSNR_CEILING_DB,
    capture_temporal_features,
    psnr,
    temporal_feature_error,
    temporal_module_names,
    trajectory_error,
)
from harness.models.base import DiffusionModel
from methods.engine.modules import QuantLayer, QuantSpec, quantize_layers

torch.set_num_threads(1)
TIMESTEPS = [999, 500, 250, 0]


def tiny_unet_model(num_classes: int | None = None) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    ).eval()
    return DiffusionModel("tiny", "unet", net, {"num_train_timesteps": 1000}, (1, 8, 8), num_classes=num_classes)


def tiny_dit_model() -> DiffusionModel:
    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=11).eval()
    return DiffusionModel("tiny-dit", "dit", net, {"num_train_timesteps": 1000}, (1, 8, 8), num_classes=10)


def w4_copy(model: DiffusionModel) -> DiffusionModel:
    net = copy.deepcopy(model.net)
    quantize_layers(net, QuantSpec(4, None))
    return model.with_net(net)


def test_unet_temporal_error_zero_for_fp_positive_for_w4() -> None:
    model = tiny_unet_model()
    fp = capture_temporal_features(model, TIMESTEPS)
    names = [n for n, _ in model.net.named_modules() if n.endswith("time_emb_proj")]
    assert sorted(fp) == sorted(names) and len(names) == 8
    width = model.net.get_submodule(names[0]).out_features
    assert fp[names[0]].shape == (len(TIMESTEPS), width)
    assert not torch.allclose(fp[names[0]][0], fp[names[0]][-1])  # it does depend on t

    same, per_block = temporal_feature_error(fp, capture_temporal_features(model.with_net(copy.deepcopy(model.net)),
                                                                            TIMESTEPS))
    assert same == [0.0] * len(TIMESTEPS) and all(v == [0.0] * 4 for v in per_block.values())

    q = w4_copy(model)
    assert isinstance(q.net.get_submodule(names[0]), QuantLayer)  # hooked by name, through the wrapper
    err, per_block = temporal_feature_error(fp, capture_temporal_features(q, TIMESTEPS))
    assert len(err) == len(TIMESTEPS) and all(0 < e < 1 for e in err)
    assert set(per_block) == set(names)
    assert err[1] == pytest.approx(sum(v[1] for v in per_block.values()) / len(per_block))


def test_class_conditional_features_cover_every_label() -> None:
    model = tiny_unet_model(num_classes=10)
    labels = torch.tensor([0, 3, 10])  # two classes and the CFG null label
    feats = capture_temporal_features(model, TIMESTEPS[:2], labels)
    name = next(iter(feats))
    width = model.net.get_submodule(name).out_features
    assert feats[name].shape == (2, 3 * width)
    one = capture_temporal_features(model, TIMESTEPS[:2], labels[1:2])[name]
    torch.testing.assert_close(feats[name][:, width : 2 * width], one)
    assert not torch.allclose(feats[name][:, :width], one)  # the label changes the feature


def test_dit_adaln_modulations_are_temporal_features() -> None:
    model = tiny_dit_model()
    names = temporal_module_names(model.net)
    assert names == ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1"]
    labels = torch.tensor([1, 10])
    fp = capture_temporal_features(model, TIMESTEPS, labels)
    err, _ = temporal_feature_error(fp, capture_temporal_features(w4_copy(model), TIMESTEPS, labels))
    assert all(e > 0 for e in err)
    with pytest.raises(KeyError, match="only FP"):
        temporal_feature_error(fp, {k: v for k, v in fp.items() if k != "proj_out_1"})


def test_trajectory_error_and_psnr() -> None:
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(3, 2, 1, 4, 4, generator=g)
    q = fp.clone()
    q[1] += 0.5
    q[2] += torch.full_like(q[2], 2.0)
    assert trajectory_error(fp, q) == pytest.approx([0.0, 0.25, 4.0])
    images = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    assert psnr(images, images + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr(images, images) == pytest.approx(PSNR_CEILING_DB) == pytest.approx(58.92, abs=0.01)
    with pytest.raises(ValueError, match="shape"):
        trajectory_error(fp, q[:2])
