"""What a configuration (e.g. a paper preset) would cost on this machine, before running it.

    python -m harness.estimate experiment=paper_cifar10_ddim100
    python -m harness.estimate experiment=paper_sd_coco device=cuda

The config is composed with Hydra's compose API exactly as run.py does. The preset's denoiser is built
with random weights (`model.init=random`: same architecture, nothing downloaded), a few denoiser calls
are timed at a small batch, and the time per denoiser row is multiplied out:

    sampling = n_samples x steps x guidance factor (2 with classifier-free guidance) x time per row
               + n_samples x decode time per image (latent pipelines; a random decoder of the
                 standard SD-VAE / LDM VQ-f4 size is timed)
    calibration capture = trajectories the method's recipe needs x steps x guidance factor x time per row

A run of a quantization method samples twice (the FP reference, shared by the sweep, and the
quantized model) plus calibration and the method's own reconstruction, which this does not estimate.
Rows cost about the same at any batch size on a CPU; on a GPU small batches under-use the device, so
the estimate is an upper bound there.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import methods
from harness.config import RunConfig
from harness.models.base import DiffusionModel, denoise
from harness.models.decoder import Decoder
from harness.models.zoo import load_model
from harness.runner import resolve_device
from harness.sampling import schedule_timesteps

CONF = Path(__file__).resolve().parents[1] / "conf"
# The decoders of the papers' latent models at their usual size (SD / DiT KL-f8 VAE, LDM-4 VQ-f4).
STANDARD_DECODERS: dict[str, Callable[[], torch.nn.Module]] = {
    "vae": lambda: AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4),
    "vqvae": lambda: VQModel(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=3, num_vq_embeddings=8192,
        vq_embed_dim=3),
}


def compose_config(overrides: list[str]) -> dict[str, Any]:
    """The resolved config of `python run.py <overrides>`."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def seconds_per_row(model: DiffusionModel, batch: int, device: torch.device, repeats: int) -> float:
    """Seconds per denoiser row (one sample at one step, one guidance branch) at batch `batch`."""
    x = torch.randn((batch, *model.sample_shape), device=device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    cond = model.null_cond(batch, device) if model.is_conditional else None
    with torch.no_grad():
        return _timed(lambda: denoise(model, x, t, cond), device, repeats) / batch


def seconds_per_decode(kind: str, latent_shape: tuple[int, int, int], device: torch.device, repeats: int) -> float:
    """Seconds to decode one latent with a random decoder of the standard size for `kind`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = Decoder(kind, STANDARD_DECODERS[kind]().eval().to(device))
    z = torch.randn((1, *latent_shape), device=device)
    return _timed(lambda: decoder.decode(z), device, repeats)


def estimate(raw: dict[str, Any], batch: int = 2, repeats: int = 3) -> dict[str, Any]:
    """Timings and the multiplied-out estimate for a resolved config (see the module docstring)."""
    rc = RunConfig.parse({**raw, "eval": {**raw["eval"], "reference": "fp"}})  # no reference data needed here
    device = resolve_device(rc.device)
    model_cfg = {**rc.model, "init": "random", "path": None}
    model = load_model(model_cfg)
    model.net.to(device).eval()
    guidance = 2 if model.is_conditional and model.guidance_scale != 1.0 else 1
    row = seconds_per_row(model, batch * guidance, device, repeats)
    steps, n = rc.sampler.steps, rc.eval.n_samples
    decode = seconds_per_decode(rc.model["decoder"], model.sample_shape, device, repeats) if rc.model.get(
        "decoder") else 0.0
    denoiser_s = n * steps * guidance * row
    out: dict[str, Any] = {
        "model": rc.model["name"], "params": sum(p.numel() for p in model.net.parameters()), "device": str(device),
        "sampler": f"{rc.sampler.name} {steps} steps", "n_samples": n, "guidance_factor": guidance,
        "seconds_per_row": row, "seconds_per_decode": decode,
        "sampling_seconds": denoiser_s + n * decode,
    }
    if rc.method.get("name") != "fp":
        method = methods.METHODS.get(rc.method["name"])(rc.method, rc.recipe)
        need = method.calibration_rows_per_step(schedule_timesteps(model, rc.sampler),
                                                int(model.scheduler_config.get("num_train_timesteps", 1000)))
        trajectories = max(rc.calibration.n_samples, math.ceil(need / guidance))
        out["calibration_trajectories"] = trajectories
        out["calibration_capture_seconds"] = trajectories * steps * guidance * row
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def report(est: dict[str, Any]) -> str:
    lines = [
        f"{est['model']} ({est['params'] / 1e6:.0f}M params) on {est['device']}, {est['sampler']}, "
        f"guidance factor {est['guidance_factor']}",
        f"  denoiser: {est['seconds_per_row'] * 1e3:.1f} ms per row"
        + (f"; decoder: {est['seconds_per_decode'] * 1e3:.0f} ms per image" if est["seconds_per_decode"] else ""),
        f"  sampling {est['n_samples']} images: {_hours(est['sampling_seconds'])} per sampling pass "
        "(a quantized run adds its own pass to the shared FP one)",
    ]
    if "calibration_trajectories" in est:
        lines.append(f"  calibration capture: {est['calibration_trajectories']} FP trajectories, "
                     f"{_hours(est['calibration_capture_seconds'])} (reconstruction not included)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py (e.g. experiment=paper_sd_coco)")
    parser.add_argument("--batch", type=int, default=2, help="rows per timed denoiser call (x2 with guidance)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (median) after one warm-up")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(report(estimate(compose_config(args.overrides), args.batch, args.repeats)))


if __name__ == "__main__":
    main()
