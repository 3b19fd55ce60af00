"""Block discovery and skip-concat splits on tiny diffusers models of every family.

Also home of the tiny-model helpers the other engine / baseline tests import (`tiny_model`,
`tiny_calib`): a few 10k parameters, 8x8 samples, calibration rows from a real 4-step DDIM run.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from harness.calibration import CalibData
from harness.models.base import DiffusionModel, denoise
from methods.engine.blocks import enable_skip_split, find_blocks, skip_splits
from methods.engine.modules import QuantLayer, QuantSpec, quant_layers, quantize_layers

torch.set_num_threads(1)

FAMILIES = ["unet", "unet_cond", "unet_text", "dit"]
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "clip_sample": False}


def tiny_model(kind: str, seed: int = 0) -> DiffusionModel:
    """A randomly initialised denoiser of the given kind (unet, unet_cond, unet_text, dit)."""
    torch.manual_seed(seed)
    unet = dict(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
    )
    if kind in ("unet", "unet_cond"):
        net = UNet2DModel(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
            num_class_embeds=5 if kind == "unet_cond" else None,
            **unet,
        )
        return DiffusionModel(
            kind, "unet", net.eval(), SCHEDULER, (1, 8, 8),
            num_classes=4 if kind == "unet_cond" else None,
            guidance_scale=2.0 if kind == "unet_cond" else 1.0,
        )
    if kind == "unet_text":
        net = UNet2DConditionModel(
            in_channels=2,
            out_channels=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=12,
            attention_head_dim=4,
            **unet,
        )
        return DiffusionModel(
            kind, "unet_text", net.eval(), SCHEDULER, (2, 8, 8), cond_shape=(3, 12), guidance_scale=2.0
        )
    if kind == "dit":
        net = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=2,
            out_channels=4,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=4,
        )
        return DiffusionModel(kind, "dit", net.eval(), SCHEDULER, (2, 8, 8), num_classes=4, guidance_scale=2.0)
    raise ValueError(kind)


@torch.no_grad()
def tiny_calib(model: DiffusionModel, n: int = 4, steps: int = 4, seed: int = 1) -> CalibData:
    """Denoiser inputs of a real DDIM run (both CFG branches when conditional)."""
    gen = torch.Generator().manual_seed(seed)
    sched = DDIMScheduler(**SCHEDULER)
    sched.set_timesteps(steps)
    x = torch.randn((n, *model.sample_shape), generator=gen)
    if model.num_classes is not None:
        cond = torch.randint(model.num_classes, (n,), generator=gen)
    elif model.cond_shape is not None:
        cond = torch.randn((n, *model.cond_shape), generator=gen)
    else:
        cond = None
    xs, ts, cs = [], [], []
    for t in sched.timesteps:
        if model.is_conditional:
            xin, cin = torch.cat([x, x]), torch.cat([cond, model.null_cond(n)])
        else:
            xin, cin = x, None
        tin = torch.full((xin.shape[0],), int(t), dtype=torch.long)
        eps = denoise(model, xin, tin, cin)
        if model.is_conditional:
            c, u = eps.chunk(2)
            eps = u + model.guidance_scale * (c - u)
        xs.append(xin)
        ts.append(tin)
        if cin is not None:
            cs.append(cin)
        x = sched.step(eps, t, x).prev_sample
    labels = [] if model.num_classes is None else list(range(model.num_classes + 1))
    return CalibData(
        torch.cat(xs), torch.cat(ts), torch.cat(cs) if cs else None,
        [int(t) for t in sched.timesteps], SCHEDULER["num_train_timesteps"], labels,
    )


def quantized(kind: str, spec: QuantSpec | None = None) -> DiffusionModel:
    model = tiny_model(kind)
    quantize_layers(model.net, spec or QuantSpec(8, 8))
    return model


def _run_once(model: DiffusionModel, calib: CalibData):
    row = calib.subset(torch.arange(1))
    return lambda: denoise(model, row.x, row.t, row.cond)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_quant_layer_in_exactly_one_unit(kind: str) -> None:
    model = quantized(kind)
    units = find_blocks(model.net)
    owners: dict[str, list[str]] = {}
    for unit_name, unit in units:
        for rel, _ in quant_layers(unit):
            full = f"{unit_name}.{rel}" if rel else unit_name
            owners.setdefault(full, []).append(unit_name)
    assert sorted(owners) == sorted(n for n, _ in quant_layers(model.net))
    assert all(len(v) == 1 for v in owners.values())


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("unet", {ResnetBlock2D, Attention, QuantLayer}),
        ("unet_text", {ResnetBlock2D, Transformer2DModel, QuantLayer}),
        ("dit", {BasicTransformerBlock, QuantLayer}),
    ],
)
def test_unit_kinds_per_family(kind: str, expected: set[type]) -> None:
    units = find_blocks(quantized(kind).net)
    kinds = {type(m) for _, m in units}
    assert expected <= kinds
    if kind == "dit":
        assert not any(isinstance(m, ResnetBlock2D) for _, m in units)


@pytest.mark.parametrize("kind", FAMILIES)
def test_static_order_matches_execution_order(kind: str) -> None:
    model = quantized(kind)
    calib = tiny_calib(model, n=1, steps=1)
    static = find_blocks(model.net)
    traced = find_blocks(model.net, order_by=_run_once(model, calib))
    assert sorted(n for n, _ in static) == sorted(n for n, _ in traced)

    def blocks_only(units):  # single layers (conv_in vs time embedding) may run in either order
        return [n for n, m in units if not isinstance(m, QuantLayer)]

    assert blocks_only(static) == blocks_only(traced)
    names = [n for n, _ in traced]
    if kind != "dit":
        assert names.index("mid_block.resnets.0") < names.index("up_blocks.0.resnets.0")
        attn = next(n for n in names if n.startswith("down_blocks.") and n.endswith("attentions.0"))
        assert names.index(attn.replace("attentions", "resnets")) < names.index(attn)
        assert names.index(attn) < names.index("mid_block.resnets.0")
    assert names[-1] in ("conv_out", "proj_out_2")


def test_units_without_quant_layers_are_left_out() -> None:
    model = quantized("unet")
    names = [n for n, _ in find_blocks(model.net)]
    model_fp = tiny_model("unet")
    quantize_layers(model_fp.net, QuantSpec(8, 8), keep_fp=["down_blocks.0.resnets.0.*"])
    names_fp = [n for n, _ in find_blocks(model_fp.net)]
    assert "down_blocks.0.resnets.0" in names
    assert "down_blocks.0.resnets.0" not in names_fp


@pytest.mark.parametrize("kind", ["unet", "unet_text"])
def test_skip_splits_match_concat_point(kind: str) -> None:
    model = quantized(kind)
    calib = tiny_calib(model, n=1, steps=1)
    splits = skip_splits(model.net, _run_once(model, calib))
    # one entry per up-block resnet, each strictly inside its input channels
    up_resnets = [n for n, m in model.net.named_modules() if n.startswith("up_blocks") and isinstance(m, ResnetBlock2D)]
    assert sorted(splits) == sorted(up_resnets)
    # ground truth: each up-block resnet's input ends with exactly the skip tensor it was given
    skips: dict[str, tuple] = {}
    inputs: dict[str, torch.Tensor] = {}
    for name in up_resnets:
        block_name = name.rsplit(".", 2)[0]

        def block_pre(_m, args, kwargs, block_name=block_name):
            skips[block_name] = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)

        def resnet_pre(_m, args, name=name):
            inputs[name] = args[0]

        model.net.get_submodule(block_name).register_forward_pre_hook(block_pre, with_kwargs=True)
        model.net.get_submodule(name).register_forward_pre_hook(resnet_pre)
    with torch.no_grad():
        _run_once(model, calib)()
    for name in up_resnets:
        block_name, _, i = name.rsplit(".", 2)
        assert torch.equal(inputs[name][:, splits[name] :], skips[block_name][-1 - int(i)])
    done = enable_skip_split(model.net, splits)
    assert done and all(model.net.get_submodule(n).split == splits[n.rsplit(".", 1)[0]] for n in done)
