"""harness.models.convert_ldm on tiny random checkpoints in the original CompVis LDM key layout.

The checkpoints are built here from tiny diffusers models whose weights are renamed to LDM's names
(openaimodel UNet, taming VQ autoencoder, ClassEmbedder) by an inverse mapping written in this file;
converting them back must give the same tensors, the same outputs through the zoo, and the null class
as the CFG condition. Refusals: pickled objects (never weights_only=False), stray or missing tensors,
a schedule that does not match the checkpoint's buffers."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from omegaconf import OmegaConf
from safetensors.torch import save_file

from harness.models.conditions import ClassEmbedder
from harness.models.convert_ldm import (
    ConversionError,
    convert,
    main,
    scheduler_config,
    unet_config,
    vq_config,
)
from harness.models.zoo import load_model

LAYERS, LEVELS, ATTN = 1, 2, [False, True]  # num_res_blocks, len(channel_mult), attention per level (ds 1, 2)
CLASSES, CONTEXT = 10, 16
PARAMS = {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
    "cond_stage_key": "class_label", "conditioning_key": "crossattn",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": LAYERS, "channel_mult": [1, 2], "num_heads": 1, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": CONTEXT}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": LAYERS, "attn_resolutions": [], "dropout": 0.0}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": CLASSES + 1, "embed_dim": CONTEXT, "key": "class_label"}},
}
# The diffusers models these LDM settings mean, written out by hand (not by the converter's own code).
UNET = {"sample_size": 8, "in_channels": 3, "out_channels": 3, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": CONTEXT, "attention_head_dim": 1}
VQ = {"in_channels": 3, "out_channels": 3, "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 3,
      "num_vq_embeddings": 16, "vq_embed_dim": 3}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VQ_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel names -> openaimodel names (input_blocks / middle_block / output_blocks)."""
    out = {}
    for key, v in sd.items():
        top = next((k for k in UNET_TOP if key.startswith(k + ".")), None)
        if top:
            name = UNET_TOP[top] + key[len(top):]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + i * (LAYERS + 1) + j
            name = f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{1 + int(m[1]) * (LAYERS + 1) + LAYERS}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = i * (LAYERS + 1) + j
            name = f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            i = int(m[1])
            slot = 2 if list(reversed(ATTN))[i] else 1
            name = f"output_blocks.{i * (LAYERS + 1) + LAYERS}.{slot}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + name] = v
    return out


def vq_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers VQModel names -> taming's (encoder.down.i.block.j, mid.attn_1 with 1x1 convs, decoder.up reversed)."""
    out = {}
    for key, v in sd.items():
        name = key.replace("conv_norm_out", "norm_out")
        if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|\w+)\.(.+)", key):
            name = f"{m[1]}.mid.attn_1.{VQ_ATTN[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if m[2] != "group_norm" and m[3] == "weight" else v
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"decoder.up.{LEVELS - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            name = f"decoder.up.{LEVELS - 1 - int(m[1])}.upsample.conv.{m[2]}"
        out["first_stage_model." + name] = v
    return out


def ldm_alphas_cumprod(params: dict) -> torch.Tensor:
    """LatentDiffusion's buffer: betas linear in sqrt space, in float64, stored as float32."""
    betas = torch.linspace(params["linear_start"] ** 0.5, params["linear_end"] ** 0.5, params["timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nets = {"unet": UNet2DConditionModel(**UNET), "vqvae": VQModel(**VQ),
                "class_embedder": ClassEmbedder(num_classes=CLASSES, embedding_dim=CONTEXT)}
        for net in nets.values():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
            for p in net.parameters():
                p.data.add_(0.1 * torch.randn_like(p))
    return {k: v.eval() for k, v in nets.items()}


def ldm_state(reference: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    state = {**unet_to_ldm(reference["unet"].state_dict()), **vq_to_ldm(reference["vqvae"].state_dict()),
             "cond_stage_model.embedding.weight": reference["class_embedder"].embedding.weight.detach().clone()}
    state["alphas_cumprod"] = ldm_alphas_cumprod(PARAMS)
    state["betas"] = torch.zeros(PARAMS["timesteps"])  # a buffer the converter knows and skips
    return state


@pytest.fixture
def files(tmp_path: Path, reference: dict[str, torch.nn.Module]) -> tuple[Path, Path]:
    config = tmp_path / "cin-tiny.yaml"
    OmegaConf.save(OmegaConf.create({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                                               "params": PARAMS}}), config)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": ldm_state(reference), "global_step": 7, "epoch": 1}, ckpt)  # a Lightning-style dict
    return ckpt, config


def zoo_cfg(folder: Path) -> dict:
    return {"name": "tiny_cin", "family": "unet_text", "sample_shape": [3, 8, 8], "num_classes": CLASSES,
            "cond_shape": [1, CONTEXT], "class_embedder": "ldm", "guidance_scale": 3.0, "decoder": "vqvae",
            "image_shape": [3, 16, 16], "init": "pretrained", "path": str(folder), "scheduler": None}


@torch.no_grad()
def test_round_trip_gives_the_same_tensors_and_outputs(files: tuple[Path, Path], tmp_path: Path,
                                                       reference: dict[str, torch.nn.Module]) -> None:
    ckpt, config = files
    out = convert(ckpt, config, tmp_path / "out")
    loaded = {"unet": UNet2DConditionModel.from_pretrained(out / "unet"),
              "vqvae": VQModel.from_pretrained(out / "vqvae"),
              "class_embedder": ClassEmbedder.from_pretrained(out / "class_embedder")}
    for part, net in loaded.items():
        want, got = reference[part].state_dict(), net.state_dict()
        assert sorted(got) == sorted(want), part
        assert all(torch.equal(got[k], want[k]) for k in want), f"{part}: a tensor changed on the way"
    assert loaded["vqvae"].config.scaling_factor == 1.0, "LDM's scale_factor (default 1.0), never SD's 0.18215"

    model = load_model(zoo_cfg(out))
    assert model.num_classes is None and model.conditions.num_classes == CLASSES
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([999, 1])
    labels = torch.tensor([3, CLASSES])
    context = reference["class_embedder"](labels)
    assert context.shape == (2, 1, CONTEXT)
    assert torch.allclose(model.conditions.embed(labels), context)
    assert torch.allclose(model.null_cond(1)[0], context[1]), "the CFG null condition is the null class's row"
    want = reference["unet"](x, t, encoder_hidden_states=context).sample
    assert torch.allclose(model.net(x, t, encoder_hidden_states=model.conditions.embed(labels)).sample, want)
    z = torch.randn(2, 3, 8, 8)
    assert torch.allclose(model.decode(z), reference["vqvae"].decode(z).sample.clamp(-1, 1), atol=1e-6)


def test_scheduler_is_ldms_ddim(files: tuple[Path, Path], tmp_path: Path) -> None:
    out = convert(*files, tmp_path / "out")
    sched = DDIMScheduler.from_pretrained(out / "scheduler")
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == list(range(951, 0, -50)), "LDM's DDIM visits 1 + k * 50"
    assert float(sched.final_alpha_cumprod) == pytest.approx(float(sched.alphas_cumprod[0])), "set_alpha_to_one False"
    assert torch.allclose(sched.alphas_cumprod, ldm_alphas_cumprod(PARAMS), rtol=1e-5)


def test_safetensors_input_and_the_cli(tmp_path: Path, reference: dict[str, torch.nn.Module],
                                       files: tuple[Path, Path]) -> None:
    _, config = files
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state(reference).items()}, path)
    main(["--ckpt", str(path), "--config", str(config), "--out", str(tmp_path / "cli")])
    assert (tmp_path / "cli" / "class_embedder" / "config.json").is_file()
    assert '"sha256"' in (tmp_path / "cli" / "conversion.json").read_text()


def test_a_checkpoint_that_needs_unpickling_is_refused(files: tuple[Path, Path], tmp_path: Path,
                                                       reference: dict[str, torch.nn.Module]) -> None:
    _, config = files
    ckpt = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": ldm_state(reference), "hparams": argparse.Namespace(lr=1e-4)}, ckpt)
    with pytest.raises(ConversionError, match=r"weights_only=True.*Re-save its state_dict.*lightning\.safetensors"):
        convert(ckpt, config, tmp_path / "out")
    with pytest.raises(SystemExit, match=r"convert_ldm: .*never unpickles"):
        main(["--ckpt", str(ckpt), "--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit", ["stray", "unexpected", "missing", "schedule"])
def test_a_checkpoint_that_does_not_fit_is_refused(files: tuple[Path, Path], tmp_path: Path,
                                                   reference: dict[str, torch.nn.Module], edit: str) -> None:
    _, config = files
    state = ldm_state(reference)
    if edit == "stray":
        state["unknown.weight"] = torch.zeros(2)
        match = r"1 checkpoint tensors belong to no part: unknown\.weight"
    elif edit == "unexpected":
        state["cond_stage_model.extra.weight"] = torch.zeros(2)
        match = r"class embedder does not match its architecture \(1 unexpected: extra\.weight"
    elif edit == "missing":
        del state["model.diffusion_model.out.2.weight"]
        match = r"UNet does not match its architecture \(1 missing: conv_out\.weight"
    else:
        state["alphas_cumprod"] = state["alphas_cumprod"] ** 1.1
        match = r"alphas_cumprod differ from the schedule of its config"
    ckpt = tmp_path / "edited.ckpt"
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(ConversionError, match=match):
        convert(ckpt, config, tmp_path / "out")


def test_another_ldm_kind_is_refused(files: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = files
    uncond = {**PARAMS, "cond_stage_config": "__is_unconditional__", "conditioning_key": None}
    config = tmp_path / "celeba.yaml"
    OmegaConf.save(OmegaConf.create({"model": {"params": uncond}}), config)
    with pytest.raises(ConversionError, match=r"class-conditional VQ LDMs"):
        convert(ckpt, config, tmp_path / "out")


def test_the_shipped_ldm_cin256_config_is_what_cin256_v2_converts_to() -> None:
    """conf/model/ldm_cin256.yaml (arch, scheduler, shapes) against CompVis's configs/latent-diffusion/cin256-v2.yaml
    (its values, as published in CompVis/latent-diffusion and CompVis/stable-diffusion)."""
    cin = {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "unet_config": {"params": {
        "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
        "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512}},
        "first_stage_config": {"params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}}
    shipped = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / "ldm_cin256.yaml"))
    assert shipped["arch"] == unet_config(cin)
    assert {k: v for k, v in scheduler_config(cin).items() if k != "timestep_spacing"} == shipped["scheduler"]
    vq = vq_config(cin)
    assert shipped["decoder_scaling_factor"] == vq["scaling_factor"] == 1.0
    assert shipped["sample_shape"] == [vq["latent_channels"], 64, 64] and shipped["image_shape"] == [3, 256, 256]
    assert shipped["cond_shape"] == [1, 512] and shipped["num_classes"] == 1000
