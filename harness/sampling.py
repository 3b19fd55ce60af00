"""Seeded sampling with diffusers schedulers.

The initial noise and conditions depend only on (seed, sample index), so every method sees exactly
the same noise, labels and prompts, and differences in the samples are the method's. Sampling runs
in the denoiser's (latent) space; the pipeline's FP decoder turns each batch into images in [-1, 1],
which is all metrics, grids and the FP reference ever see. Optionally records the latent trajectory
of the first samples (for the per-step trajectory error) and hands every denoiser input to a callback
(calibration capture). Non-finite latents fail the run at the sampler step where they first appear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    SchedulerMixin,
)

from harness.config import SamplerConfig
from harness.finite import check_finite
from harness.models.base import DiffusionModel, denoise
from harness.progress import progress_bar

NOISE_CHUNK = 1000
StepCallback = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]


def make_scheduler(model: DiffusionModel, cfg: SamplerConfig) -> SchedulerMixin:
    """The diffusers scheduler for `cfg`, built from the model's training noise schedule."""
    base = dict(model.scheduler_config)
    base.pop("_class_name", None)
    base.pop("_diffusers_version", None)
    if cfg.name == "ddim":
        sched = DDIMScheduler.from_config(base)
    elif cfg.name == "ddpm":
        sched = DDPMScheduler.from_config(base)
    elif cfg.name == "dpm_solver":
        sched = DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++")
    elif cfg.name == "plms":
        sched = PNDMScheduler.from_config(base, skip_prk_steps=True)
    else:
        raise ValueError(f"<sampler.name={cfg.name}> must be one of ddim, ddpm, dpm_solver, plms")
    sched.set_timesteps(cfg.steps)
    return sched


def schedule_timesteps(model: DiffusionModel, cfg: SamplerConfig) -> list[int]:
    """The timesteps the sampler visits, in order: TFMQ's finite set."""
    return [int(t) for t in make_scheduler(model, cfg).timesteps]


def initial_noise(model: DiffusionModel, seed: int, start: int, count: int) -> torch.Tensor:
    """Noise for samples [start, start+count): a pure function of (seed, index)."""
    out = []
    first_chunk, last_chunk = start // NOISE_CHUNK, (start + count - 1) // NOISE_CHUNK
    for chunk in range(first_chunk, last_chunk + 1):
        g = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
        noise = torch.randn((NOISE_CHUNK, *model.sample_shape), generator=g)
        lo = max(start, chunk * NOISE_CHUNK) - chunk * NOISE_CHUNK
        hi = min(start + count, (chunk + 1) * NOISE_CHUNK) - chunk * NOISE_CHUNK
        out.append(noise[lo:hi])
    return torch.cat(out)


def eval_conditions(model: DiffusionModel, n: int, seed: int, start: int = 0) -> torch.Tensor | None:
    """Condition ids of samples [start, start+n) drawn by the model's source (labels or prompt indices)."""
    return None if model.conditions is None else model.conditions.draw(seed, start, n)


@dataclass
class Samples:
    images: torch.Tensor  # (N, C, H, W) decoded images in [-1, 1], float32, CPU
    conds: torch.Tensor | None  # condition ids: class labels, or indices into model.conditions.prompts
    timesteps: list[int]
    trajectory: torch.Tensor | None  # (steps, n_trajectory, C, h, w): latent x after each step
    latents: torch.Tensor | None = None  # (N, C, h, w) final latents of a latent pipeline (before decoding)


def _guided_eps(model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                on_step: StepCallback | None) -> torch.Tensor:
    use_cfg = model.is_conditional and cond is not None and model.guidance_scale != 1.0
    if not use_cfg:
        if on_step is not None:
            on_step(x, t, cond)
        return denoise(model, x, t, cond)
    null = model.null_cond(x.shape[0], x.device)
    x2, t2, c2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])
    if on_step is not None:
        on_step(x2, t2, c2)
    eps_c, eps_u = denoise(model, x2, t2, c2).chunk(2)
    return eps_u + model.guidance_scale * (eps_c - eps_u)


@torch.no_grad()
def sample(model: DiffusionModel, sampler: SamplerConfig, n: int, batch_size: int, seed: int,
           n_trajectory: int = 0, on_step: StepCallback | None = None, desc: str = "sampling",
           offset: int = 0) -> Samples:
    """Generate samples [offset, offset + n) of the eval set `seed`; the result does not depend on
    which method produced `model`. `offset` (a torchrun shard, harness/distributed.py): with `offset`
    a multiple of `batch_size` the samples equal those rows of a single-process run.

    The trajectory keeps the samples whose index is below `n_trajectory`. Raises NonFiniteError at
    the first sampler step whose latents hold NaN / inf, and for non-finite decoded images."""
    device = next(iter(model.net.parameters()), torch.empty(0)).device
    conds_all = eval_conditions(model, n, seed, offset)
    images, latents, traj_rows = [], [], []
    timesteps: list[int] = []
    steps = sampler.steps
    bar = progress_bar(total=-(-n // batch_size) * steps, desc=desc, unit="step", leave=False)
    for off in range(0, n, batch_size):
        first, count = offset + off, min(batch_size, n - off)
        sched = make_scheduler(model, sampler)
        timesteps = [int(t) for t in sched.timesteps]
        x = initial_noise(model, seed, first, count).to(device) * sched.init_noise_sigma
        ids = None if conds_all is None else conds_all[off : off + count]
        cond = None if ids is None else model.conditions.embed(ids, device)
        gen = torch.Generator(device=device).manual_seed(seed * 7919 + first)
        keep = max(0, min(count, n_trajectory - first))
        batch_traj = []
        span = f"samples {first}..{first + count - 1}"
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((count,), int(t), dtype=torch.long, device=device)
            x_in = sched.scale_model_input(x, t)
            eps = _guided_eps(model, x_in, tt, cond, on_step)
            kwargs = {"generator": gen} if sampler.name in ("ddpm", "ddim") else {}
            if sampler.name == "ddim":
                kwargs["eta"] = sampler.eta
            x = sched.step(eps, t, x, **kwargs).prev_sample
            check_finite(x, f"sampler step {i + 1}/{len(timesteps)} (t={int(t)}) of {span}")
            if keep:
                batch_traj.append(x[:keep].float().cpu())
            bar.update(1)
        decoded = model.decode(x).cpu()
        check_finite(decoded, f"decoding {span} (the latents were finite)")
        images.append(decoded)
        if model.decoder is not None:
            latents.append(x.float().cpu())
        if keep:
            traj_rows.append(torch.stack(batch_traj))
    bar.close()
    trajectory = torch.cat(traj_rows, dim=1) if traj_rows else None
    return Samples(torch.cat(images), conds_all, timesteps, trajectory, torch.cat(latents) if latents else None)
