"""TFMQ's temporal machinery on tiny random diffusers models: TIB discovery, TIAR, FSC, cache, selection."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from torch import nn

from methods.engine.context import install_timestep_context, timestep_scope
from methods.engine.modules import QuantLayer, QuantSpec, quantize_layers, set_act_mode
from methods.engine.reconstruction import ReconConfig
from methods.temporal.cache import SkippedEmbedding, TemporalFeatureCache, build_caches, install_caches
from methods.temporal.fsc import calibrate_tib_per_timestep, check_schedule, guard_schedule, tib_act_quantizers
from methods.temporal.labels import install_label_context
from methods.temporal.selection import path_errors, select_paths
from methods.temporal.tiar import reconstruct_tib, temporal_error
from methods.temporal.tib import find_tib, iter_schedule, temporal_features

torch.set_num_threads(1)

UNET_FEATURES = [
    "down_blocks.0.resnets.0.time_emb_proj",
    "down_blocks.1.resnets.0.time_emb_proj",
    "up_blocks.0.resnets.0.time_emb_proj",
    "up_blocks.0.resnets.1.time_emb_proj",
    "up_blocks.1.resnets.0.time_emb_proj",
    "up_blocks.1.resnets.1.time_emb_proj",
    "mid_block.resnets.0.time_emb_proj",
    "mid_block.resnets.1.time_emb_proj",
]
SCHEDULE = [980, 730, 500, 260, 20]
LABELS = list(range(11))  # 10 classes + the CFG null label


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, num_class_embeds=num_class_embeds,
    ).eval()


def tiny_text_unet(**extra: object) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, cross_attention_dim=12, attention_head_dim=4, **extra,
    ).eval()


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()


def _call(net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if isinstance(net, DiTTransformer2DModel):
        return net(x, timestep=t, class_labels=labels).sample
    if isinstance(net, UNet2DConditionModel):
        return net(x, t, encoder_hidden_states=torch.zeros(x.shape[0], 4, 12)).sample
    return net(x, t, class_labels=labels).sample


def _hooked_features(net: nn.Module, names: list[str], t: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """The temporal features as a full denoiser call produces them (forward hooks at their names)."""
    got: dict[str, torch.Tensor] = {}
    handles = [net.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: got.setdefault(n, o)) for n in names]
    with torch.no_grad():
        _call(net, torch.randn(t.numel(), 1, 8, 8), t, labels)
    for h in handles:
        h.remove()
    return got


# -- TIB discovery ---------------------------------------------------------------------------------
CASES = {
    "unet": (lambda: tiny_unet(), False, ["time_embedding"]),
    "unet_class": (lambda: tiny_unet(11), True, ["time_embedding", "class_embedding"]),
    "unet_text": (lambda: tiny_text_unet(), False, ["time_embedding"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unet_tib_is_time_embedding_and_every_resnet_projection(case: str) -> None:
    build, conditional, embedders = CASES[case]
    net = build()
    tib = find_tib(net)
    assert tib.family == "unet" and tib.cacheable and tib.label_conditional is conditional
    assert tib.features == UNET_FEATURES
    assert tib.layers == ["time_embedding.linear_1", "time_embedding.linear_2", *UNET_FEATURES]
    assert tib.embedders == embedders
    t = torch.tensor([5, 500, 999])
    labels = torch.tensor([1, 7, 10]) if conditional else None
    mine = temporal_features(net, tib, t, labels)
    hooked = _hooked_features(net, tib.features, t, labels)
    for name in tib.features:
        torch.testing.assert_close(mine[name], hooked[name], rtol=0, atol=0)


def test_dit_tib_is_label_time_embedder_and_adaln_modulation() -> None:
    net = tiny_dit()
    tib = find_tib(net)
    features = ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear", "proj_out_1"]
    assert tib.family == "dit" and tib.label_conditional and tib.features == features
    assert tib.embedders == ["transformer_blocks.0.norm1.emb", "transformer_blocks.1.norm1.emb"]
    assert sorted(tib.layers) == sorted([
        *(f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{j}" for i in (0, 1) for j in (1, 2)),
        *features,
    ])
    t, labels = torch.tensor([3, 400, 999]), torch.tensor([0, 9, 10])
    mine = temporal_features(net, tib, t, labels)
    hooked = _hooked_features(net, features, t, labels)
    for name in features:
        torch.testing.assert_close(mine[name], hooked[name], rtol=0, atol=0)


def test_tib_finds_the_same_layers_after_quantization() -> None:
    net = tiny_unet()
    before = find_tib(net)
    quantize_layers(net, QuantSpec(4, 8), keep_fp=["time_embedding.linear_1"])
    after = find_tib(net)
    assert after.layers == before.layers and after.features == before.features
    assert isinstance(net.get_submodule(after.features[0]), QuantLayer)


def test_add_embedding_is_split_off_and_not_cacheable() -> None:
    net = tiny_text_unet(addition_embed_type="text", encoder_hid_dim=12, addition_embed_type_num_heads=2)
    tib = find_tib(net)
    assert tib.non_finite == ["add_embedding"] and not tib.cacheable
    assert tib.features == ["time_embedding"]
    assert tib.layers == ["time_embedding.linear_1", "time_embedding.linear_2"]
    t = torch.tensor([10, 900])
    mine = temporal_features(net, tib, t)
    hooked = _hooked_features(net, ["time_embedding"], t, None)
    torch.testing.assert_close(mine["time_embedding"], hooked["time_embedding"])


def test_model_without_tib_fails_naming_what_was_searched() -> None:
    with pytest.raises(ValueError, match=r"no Temporal Information Block found in Sequential.*time_proj.*norm1\.emb"):
        find_tib(nn.Sequential(nn.Linear(2, 2)))


# -- TIAR ------------------------------------------------------------------------------------------
def test_tiar_lowers_temporal_feature_error_below_rtn() -> None:
    fp = tiny_unet(11)
    q = copy.deepcopy(fp)
    quantize_layers(q, QuantSpec(3, None), keep_fp=["time_embedding.linear_1"])
    tib = find_tib(q)
    rtn = sum(temporal_error(q, fp, tib, SCHEDULE, LABELS).values())
    stats = reconstruct_tib(q, fp, tib, SCHEDULE, LABELS, ReconConfig(iters=150, batch_size=64, lr=1e-2))
    after = sum(temporal_error(q, fp, tib, SCHEDULE, LABELS).values())
    assert stats["loss_before"] == pytest.approx(rtn)
    assert after < 0.8 * rtn, f"TIAR {after:.3g} vs RTN {rtn:.3g}"
    frozen = [q.get_submodule(n) for n in stats["layers"]]
    assert frozen and all(layer.w_q is not None for layer in frozen), "TIB layers end hard-rounded and frozen"


# -- FSC -------------------------------------------------------------------------------------------
def _quantized_tib(net: nn.Module, act_bits: int = 8) -> tuple[nn.Module, object]:
    quantize_layers(net, QuantSpec(8, act_bits), keep_fp=["time_embedding.linear_1"])
    set_act_mode(net, "off")
    return net, find_tib(net)


def test_fsc_parameters_are_keyed_by_timestep_value() -> None:
    net, tib = _quantized_tib(tiny_unet(11))
    names = calibrate_tib_per_timestep(net, tib, SCHEDULE, LABELS)
    assert names and len(names) == len(tib_act_quantizers(net, tib))
    name = "mid_block.resnets.0.time_emb_proj"
    q = net.get_submodule(name).act_quantizer
    assert q.ts_keys.tolist() == sorted(SCHEDULE)
    seen: list[torch.Tensor] = []
    handle = net.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    set_act_mode(net, "off")
    temporal_features(net, tib, torch.full((11,), 500), torch.tensor(LABELS))
    handle.remove()
    scale, zp = q.params_from_range(seen[0].min().reshape(1), seen[0].max().reshape(1))
    got_scale, got_zp = q.timestep_params(500)
    torch.testing.assert_close(got_scale.reshape(1), scale)
    torch.testing.assert_close(got_zp.reshape(1), zp)
    assert not torch.allclose(q.timestep_params(980)[0], got_scale), "ranges differ per timestep"
    q.mode = "quant"
    with timestep_scope(500):
        torch.testing.assert_close(q(seen[0]), q.quantize_with(seen[0], scale, zp))


def test_uncalibrated_timestep_fails_naming_both_schedules() -> None:
    net, tib = _quantized_tib(tiny_unet())
    calibrate_tib_per_timestep(net, tib, SCHEDULE, [])
    guard_schedule(net, SCHEDULE)
    with pytest.raises(ValueError, match=r"\[499\] were not calibrated.*\[980, 730, 500, 260, 20\].*requested \[499\]"):
        net(torch.randn(1, 1, 8, 8), torch.tensor([499]))
    both = r"\[499, 1\] were not calibrated.*\[980, 730, 500, 260, 20\].*requested \[980, 499, 1\]"
    with pytest.raises(ValueError, match=both):
        check_schedule(net, [980, 499, 1])
    check_schedule(net, list(reversed(SCHEDULE)))
    net(torch.randn(1, 1, 8, 8), torch.tensor([730]))


# -- cache -----------------------------------------------------------------------------------------
def test_cache_reproduces_fp_features_up_to_activation_quantization() -> None:
    fp = tiny_unet(11)
    tib = find_tib(fp)
    caches = build_caches(fp, tib, tib.features, SCHEDULE, LABELS, bits=8)
    net = copy.deepcopy(fp)
    nbytes = install_caches(net, caches)
    expected = sum(len(SCHEDULE) * len(LABELS) * net.get_submodule(n).codes.shape[-1] for n in tib.features)
    assert nbytes >= expected and nbytes < expected + 64 * len(tib.features) * 8, "uint8 codes + small metadata"
    install_timestep_context(net)
    install_label_context(net)
    t = torch.tensor([980, 20, 500, 500])  # mixed timesteps and labels in one batch, as with CFG
    labels = torch.tensor([3, 10, 0, 10])
    reference = _hooked_features(fp, tib.features, t, labels)
    served = _hooked_features(net, tib.features, t, labels)
    for name in tib.features:
        cache = net.get_submodule(name)
        assert isinstance(cache, TemporalFeatureCache) and cache.codes.dtype == torch.uint8
        half_step = cache.scale[[SCHEDULE.index(int(v)) for v in t]][:, None] / 2
        err = (served[name] - reference[name]).abs()
        assert bool((err <= half_step + 1e-6).all()), f"{name}: error beyond half a quantization step"
        assert float(err.max()) > 0, "served values are quantized, not the FP ones"


def test_cache_at_a32_is_exact_and_rejects_unknown_keys() -> None:
    fp = tiny_unet(11)
    tib = find_tib(fp)
    net = copy.deepcopy(fp)
    install_caches(net, build_caches(fp, tib, tib.features, SCHEDULE, LABELS, bits=None))
    install_timestep_context(net)
    install_label_context(net)
    t, labels = torch.tensor([260, 730]), torch.tensor([4, 10])
    x = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(_call(net, x, t, labels), _call(fp, x, t, labels))
    with pytest.raises(ValueError, match=r"no entry for timestep \[261\].*980, 730, 500, 260, 20"):
        _call(net, torch.ones(1, 1, 8, 8), torch.tensor([261]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="keyed by class label"):
        _unlabelled(net, tib.features[0])


def _unlabelled(net: nn.Module, name: str) -> None:
    """Call a label-keyed cache outside a denoiser call that published labels."""
    with timestep_scope(20):
        net.get_submodule(name)(torch.zeros(1, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
def test_cache_refuses_to_be_traced_but_lookup_is_plain_indexing() -> None:
    fp = tiny_unet()
    tib = find_tib(fp)
    cache = build_caches(fp, tib, tib.features[:1], SCHEDULE, [], bits=8)[tib.features[0]]
    with pytest.raises(RuntimeError, match="trace would freeze"), timestep_scope(20):
        torch.jit.trace(cache, torch.zeros(1, 32))
    torch.testing.assert_close(cache.lookup(torch.tensor([2, 0]), torch.tensor([0, 0])),
                               torch.stack([cache.values_at(500)[0], cache.values_at(980)[0]]))


def test_skipped_embedder_keeps_shapes() -> None:
    stub = SkippedEmbedding(6)
    out = stub(torch.zeros(3), torch.zeros(3, dtype=torch.long), hidden_dtype=torch.float64)
    assert out.shape == (3, 6) and out.dtype == torch.float64 and not out.any()


# -- selection -------------------------------------------------------------------------------------
def test_select_paths_keeps_the_smaller_error() -> None:
    choices = select_paths({"a": (1.0, 2.0), "b": (3.0, 0.5), "c": (0.2, 0.2)})
    assert [(c.feature, c.path) for c in choices] == [("a", "tib"), ("b", "cache"), ("c", "cache")]


def test_selection_picks_the_measured_better_path() -> None:
    fp = tiny_unet()
    good, bad = UNET_FEATURES[0], UNET_FEATURES[1]
    q = copy.deepcopy(fp)
    # `good` keeps an exact TIB path (FP projection, FP embedding, a32); `bad` is quantized to 2 bits.
    keep = ["time_embedding.*", good, *[n for n in UNET_FEATURES if n != bad]]
    quantize_layers(q, QuantSpec(2, None), keep_fp=keep)
    tib = find_tib(q)
    caches = build_caches(fp, tib, tib.features, SCHEDULE, [], bits=4)
    errors = path_errors(q, fp, tib, caches, SCHEDULE, [])
    with torch.no_grad():
        fp_rows = dict(iter_schedule(fp, tib, SCHEDULE, []))
        q_rows = dict(iter_schedule(q, tib, SCHEDULE, []))
    for name in (good, bad):
        tib_mse = sum(float((q_rows[t][name] - fp_rows[t][name]).pow(2).mean()) for t in SCHEDULE) / len(SCHEDULE)
        assert errors[name][0] == pytest.approx(tib_mse)
    assert errors[good][0] == 0.0 < errors[good][1]
    assert errors[bad][0] > errors[bad][1] > 0.0
    paths = {c.feature: c.path for c in select_paths(errors)}
    assert paths[good] == "tib" and paths[bad] == "cache"
