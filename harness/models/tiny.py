"""Tiny random diffusers pipeline folders, built offline from config dicts (tests, CPU measurements).

Each kind is laid out exactly like a real checkpoint folder, saved with `save_pretrained`
(safetensors), so the zoo loads it through the same code path as a user's Stable Diffusion, LDM or
DiT folder:

    ldm_kl   unet/ (UNet2DModel, latents 4x14x14) + vae/ (AutoencoderKL -> 1x28x28) + scheduler/
    ldm_vq   unet/ (UNet2DModel, latents 3x8x8) + vqvae/ (VQModel -> 3x16x16) + scheduler/
    t2i      unet/ (UNet2DConditionModel, latents 4x8x8, text states 8x16) + vae/ (-> 3x16x16)
             + text_encoder/ (CLIPTextModel) + tokenizer/ (CLIPTokenizer, own vocab.json / merges.txt)
    dit_vae  transformer/ (DiTTransformer2DModel, 10 classes, latents 4x14x14) + vae/ (-> 1x28x28)
    ldm_cin  unet/ (UNet2DConditionModel, latents 3x8x8, 1-token context of width 16) + vqvae/
             (-> 3x16x16) + class_embedder/ (ClassEmbedder: 10 classes + the null class), the layout
             of ImageNet LDM-4 cin256-v2 after harness.models.convert_ldm

The conf/model/tiny_<kind>.yaml configs describe them (1-channel 28x28 decoders feed the LeNet
extractor, 3-channel ones the Inception path). The scaling factors are deliberately not the SD
default, so a loader that ignores the checkpoint's value is caught.

    python -m harness.models.tiny --kind ldm_kl --out .cache/tiny_pipelines/ldm_kl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from harness.models.conditions import ClassEmbedder

KINDS = ("ldm_kl", "ldm_vq", "t2i", "dit_vae", "ldm_cin")
MAX_LENGTH, HIDDEN = 8, 16

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "prediction_type": "epsilon", "clip_sample": False}
_AE = {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
       "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
VAE_GRAY = {**_AE, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "sample_size": 28, "scaling_factor": 0.5}
VAE_RGB = {**_AE, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 16, "scaling_factor": 0.5}
VQ_RGB = {**_AE, "in_channels": 3, "out_channels": 3, "latent_channels": 3, "sample_size": 16, "num_vq_embeddings": 16,
          "scaling_factor": 0.8}
_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4}
UNET_KL = {**_UNET, "sample_size": 14, "in_channels": 4, "out_channels": 4, "attention_head_dim": 8,
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
UNET_VQ = {**UNET_KL, "sample_size": 8, "in_channels": 3, "out_channels": 3}
UNET_TEXT = {**_UNET, "sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": HIDDEN,
             "attention_head_dim": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
UNET_CIN = {**UNET_TEXT, "in_channels": 3, "out_channels": 3}
CLASS_EMBEDDER = {"num_classes": 10, "embedding_dim": HIDDEN}
DIT = {"sample_size": 14, "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_layers": 2,
       "num_attention_heads": 2, "attention_head_dim": 16, "num_embeds_ada_norm": 10, "norm_type": "ada_norm_zero"}
TEXT_ENCODER = {"hidden_size": HIDDEN, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": MAX_LENGTH, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}

# (subfolder, class, constructor config) per kind; the scheduler comes with every kind.
PARTS: dict[str, list[tuple[str, Any, dict]]] = {
    "ldm_kl": [("unet", UNet2DModel, UNET_KL), ("vae", AutoencoderKL, VAE_GRAY)],
    "ldm_vq": [("unet", UNet2DModel, UNET_VQ), ("vqvae", VQModel, VQ_RGB)],
    "t2i": [("unet", UNet2DConditionModel, UNET_TEXT), ("vae", AutoencoderKL, VAE_RGB)],
    "dit_vae": [("transformer", DiTTransformer2DModel, DIT), ("vae", AutoencoderKL, VAE_GRAY)],
    "ldm_cin": [("unet", UNet2DConditionModel, UNET_CIN), ("vqvae", VQModel, VQ_RGB),
                ("class_embedder", ClassEmbedder, CLASS_EMBEDDER)],
}


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer from a tiny vocabulary (letters, end-of-word letters, a few merges)."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [("a", "t</w>"), ("c", "at</w>"), ("d", "o"), ("do", "g</w>"), ("o", "f</w>")]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build(kind: str, out: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline `kind` (random weights from `seed`) to `out`; returns the folder."""
    if kind not in KINDS:
        raise ValueError(f"<--kind={kind}> must be one of {', '.join(KINDS)}")
    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for sub, cls, config in PARTS[kind]:
            cls(**config).save_pretrained(out / sub, safe_serialization=True)
        if kind == "t2i":
            tokenizer = write_tokenizer(out / "tokenizer")
            config = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), **TEXT_ENCODER)
            CLIPTextModel(config).save_pretrained(out / "text_encoder", safe_serialization=True)
    DDPMScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True, help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
