"""Convert an original CompVis class-conditional LDM checkpoint (ImageNet LDM-4 cin256-v2) into the
pipeline folder the zoo loads (`conf/model/ldm_cin256.yaml`):

    python -m harness.models.convert_ldm --ckpt cin256-v2.ckpt --config cin256-v2.yaml --out /models/ldm-cin256-v2

    unet/            UNet2DConditionModel (openaimodel UNet with SpatialTransformer cross-attention)
    vqvae/           VQModel (the VQ-f4 first stage, scaling_factor written explicitly: LDM's scale_factor)
    class_embedder/  ClassEmbedder (nn.Embedding(n_classes, D), the last class the null class)
    scheduler/       DDIMScheduler with LDM's schedule and DDIM conventions
    conversion.json  what was converted (file, size, sha256, config) and with which diffusers

The weights are renamed by diffusers' own single-file helpers (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` in diffusers.loaders.single_file_utils); this module maps what those do
not cover (the VQ codebook, the class embedder) and builds the configs from the LDM yaml, because
diffusers' config helper targets Stable Diffusion (it guesses the image size from the checkpoint and
defaults the autoencoder's scaling factor to SD's 0.18215, where LDM's VQ models use 1.0).

Every part is loaded strictly (a missing or unexpected tensor fails, naming it), every tensor of the
checkpoint must land in a part or be a known LatentDiffusion buffer, and the checkpoint's own
`alphas_cumprod` must equal the written scheduler's.

The checkpoint is read with `torch.load(weights_only=True)` only (or from .safetensors): a Lightning
checkpoint that needs arbitrary unpickling is refused with how to re-save its state_dict, because
unpickling runs code from the file.
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from harness.atomic import file_sha256
from harness.models.conditions import ClassEmbedder

UNET_PREFIX, VQ_PREFIX, COND_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
# LatentDiffusion's registered buffers (the noise schedule, recomputed from the yaml) and training-only state.
BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
           "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
           "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
           "logvar", "lvlb_weights", "scale_factor"}
TARGETS = {"unet": "openaimodel.UNetModel", "first_stage": "VQModelInterface", "cond_stage": "ClassEmbedder"}


class ConversionError(ValueError):
    """The checkpoint or its config is not what this converter handles; the message says why."""


def _resave_hint(path: Path) -> str:
    return (f"Re-save its state_dict once, in a Python session you trust with that file: "
            f"`ckpt = torch.load('{path}', weights_only=False); "
            f"safetensors.torch.save_file({{k: v.contiguous() for k, v in ckpt['state_dict'].items()}}, "
            f"'{path.with_suffix('.safetensors')}')`, then convert the .safetensors file")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a torch checkpoint readable with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConversionError(f"{path} holds objects other than tensors, which torch.load(weights_only=True) "
                              f"refuses to unpickle ({str(err).splitlines()[0]}); this converter never unpickles "
                              f"arbitrary objects. {_resave_hint(path)}") from err
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state:
        raise ConversionError(f"{path} holds no state_dict (a mapping of tensor names to tensors)")
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{path}: the state_dict holds non-tensor entries {bad[:5]}")
    return dict(state)


def _check_targets(params: Mapping) -> None:
    found = {"unet": params.get("unet_config", {}).get("target", ""),
             "first_stage": params.get("first_stage_config", {}).get("target", ""),
             "cond_stage": (params.get("cond_stage_config") or {}).get("target", "")
             if isinstance(params.get("cond_stage_config"), Mapping) else str(params.get("cond_stage_config"))}
    wrong = {k: v for k, v in found.items() if not v.endswith(TARGETS[k])}
    if wrong or params.get("conditioning_key") != "crossattn":
        raise ConversionError(f"this converter handles class-conditional VQ LDMs (cin256-v2: {TARGETS}, "
                              f"conditioning_key crossattn); the config has {found}, conditioning_key "
                              f"{params.get('conditioning_key')!r}")
    if params.get("parameterization", "eps") != "eps":
        raise ConversionError(f"parameterization {params['parameterization']!r}: only eps-prediction LDMs are handled")
    if params.get("beta_schedule", "linear") != "linear":
        raise ConversionError(f"beta_schedule {params['beta_schedule']!r}: only LDM's 'linear' (diffusers' "
                              "scaled_linear) schedule is handled")


def unet_config(params: Mapping) -> dict[str, Any]:
    """UNet2DConditionModel arguments of LDM's openaimodel UNet with a SpatialTransformer per attention level."""
    u = params["unet_config"]["params"]
    if not u.get("use_spatial_transformer") or u.get("use_scale_shift_norm") or u.get("resblock_updown"):
        raise ConversionError("the UNet must use spatial transformers without scale-shift norm or ResBlock "
                              "up/down sampling (cin256-v2's layout); UNet2DConditionModel has no equivalent")
    if u.get("num_head_channels", -1) != -1:
        raise ConversionError("num_head_channels is not handled: LDM cross-attention UNets set num_heads")
    levels = len(u["channel_mult"])
    attn = [2**i in u["attention_resolutions"] for i in range(levels)]  # attention at these downsampling rates
    return {
        "sample_size": u["image_size"], "in_channels": u["in_channels"], "out_channels": u["out_channels"],
        "block_out_channels": [u["model_channels"] * m for m in u["channel_mult"]],
        "layers_per_block": u["num_res_blocks"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "cross_attention_dim": u["context_dim"], "transformer_layers_per_block": u.get("transformer_depth", 1),
        "attention_head_dim": u["num_heads"],  # diffusers' legacy name: it is the number of heads here
    }


def vq_config(params: Mapping) -> dict[str, Any]:
    """VQModel arguments of LDM's VQ first stage; the scaling factor is LDM's scale_factor (default 1.0)."""
    f = params["first_stage_config"]["params"]
    dd = f["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ConversionError("first-stage attention at resolutions other than the middle block is not handled "
                              "(diffusers' VQModel has none)")
    if dd.get("z_channels") != f["embed_dim"]:
        raise ConversionError(f"z_channels {dd.get('z_channels')} != embed_dim {f['embed_dim']} is not handled")
    return {
        "in_channels": dd["in_channels"], "out_channels": dd["out_ch"], "sample_size": dd["resolution"],
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]], "layers_per_block": dd["num_res_blocks"],
        "down_block_types": ["DownEncoderBlock2D"] * len(dd["ch_mult"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(dd["ch_mult"]),
        "latent_channels": dd["z_channels"], "num_vq_embeddings": f["n_embed"], "vq_embed_dim": f["embed_dim"],
        "scaling_factor": float(params.get("scale_factor", 1.0)),
    }


def scheduler_config(params: Mapping) -> dict[str, Any]:
    """LDM's DDIM: betas linear in sqrt (scaled_linear), timesteps 1 + k*T/S ("leading" + steps_offset 1),
    the last step to alphas_cumprod[0] (set_alpha_to_one False), no x0 clipping."""
    return {"num_train_timesteps": params.get("timesteps", 1000), "beta_start": params["linear_start"],
            "beta_end": params["linear_end"], "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def _load_strict(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    result = model.load_state_dict(dict(tensors), strict=False)
    problems = [f"{len(keys)} {label}: {', '.join(sorted(keys)[:6])}"
                for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise ConversionError(f"the converted {what} does not match its architecture ({'; '.join(problems)})")


def _check_consumed(state: Mapping[str, torch.Tensor], prefix: str, converted: Mapping, what: str) -> None:
    """diffusers' helpers skip tensors they do not map: a count mismatch means a part would be lost."""
    source = [k for k in state if k.startswith(prefix)]
    if len(source) != len(converted):
        raise ConversionError(f"{len(source)} {what} tensors under {prefix!r} in the checkpoint, {len(converted)} "
                              "after renaming: the layout is not the one the config describes")


def _check_schedule(state: Mapping[str, torch.Tensor], sched: DDIMScheduler) -> None:
    if "alphas_cumprod" in state and not torch.allclose(state["alphas_cumprod"].double(),
                                                        sched.alphas_cumprod.double(), rtol=1e-4, atol=1e-6):
        raise ConversionError("the checkpoint's alphas_cumprod differ from the schedule of its config "
                              "(linear_start / linear_end / timesteps): wrong --config for this --ckpt?")


def convert(ckpt: str | Path, config: str | Path, out: str | Path, extract_ema: bool = False) -> Path:
    """Write the pipeline folder for `ckpt` (described by the LDM yaml `config`) to `out`; returns `out`."""
    ckpt, out = Path(ckpt), Path(out)
    params = OmegaConf.to_container(OmegaConf.load(config), resolve=True)["model"]["params"]
    _check_targets(params)
    state = load_state_dict(ckpt)

    ucfg = unet_config(params)
    unet_sd = convert_ldm_unet_checkpoint(state, {**ucfg}, extract_ema=extract_ema)
    _check_consumed(state, UNET_PREFIX, unet_sd, "UNet")
    unet = UNet2DConditionModel(**ucfg)
    _load_strict(unet, unet_sd, "UNet")

    vcfg = vq_config(params)
    if "scale_factor" in state:  # scale_by_std: the factor was measured in training and saved as a buffer
        vcfg["scaling_factor"] = float(state["scale_factor"])
    vq_sd = convert_ldm_vae_checkpoint(state, vcfg)
    codebook = f"{VQ_PREFIX}quantize.embedding.weight"
    if codebook not in state:
        raise ConversionError(f"{codebook} is not in the checkpoint: not a VQ first stage")
    vq_sd["quantize.embedding.weight"] = state[codebook]
    _check_consumed(state, VQ_PREFIX, vq_sd, "first-stage")
    vq = VQModel(**vcfg)
    _load_strict(vq, vq_sd, "VQ autoencoder")

    cond = params["cond_stage_config"]["params"]
    table = {k[len(COND_PREFIX):]: v for k, v in state.items() if k.startswith(COND_PREFIX)}
    embedder = ClassEmbedder(num_classes=int(cond["n_classes"]) - 1, embedding_dim=int(cond["embed_dim"]))
    _load_strict(embedder, table, "class embedder")

    sched = DDIMScheduler(**scheduler_config(params))
    _check_schedule(state, sched)
    known = (UNET_PREFIX, VQ_PREFIX, COND_PREFIX, "model_ema.")
    left = sorted(k for k in state if not k.startswith(known) and k not in BUFFERS)
    if left:
        raise ConversionError(f"{len(left)} checkpoint tensors belong to no part: {', '.join(left[:8])}")

    for sub, part in (("unet", unet), ("vqvae", vq), ("class_embedder", embedder)):
        part.save_pretrained(out / sub, safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    record = {"ckpt": ckpt.name, "bytes": ckpt.stat().st_size, "sha256": file_sha256(ckpt), "config": str(config),
              "extract_ema": extract_ema, "diffusers": diffusers.__version__}
    (out / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="the original checkpoint (.ckpt / .pt, or .safetensors)")
    parser.add_argument("--config", required=True, help="its LDM yaml (e.g. configs/latent-diffusion/cin256-v2.yaml)")
    parser.add_argument("--out", required=True, help="the pipeline folder to write")
    parser.add_argument("--extract-ema", action="store_true", help="take the UNet's EMA weights (model_ema.*)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.ckpt, args.config, args.out, args.extract_ema))
    except ConversionError as err:
        raise SystemExit(f"convert_ldm: {err}") from err


if __name__ == "__main__":
    main()
