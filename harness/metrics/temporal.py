"""Temporal-feature error and trajectory error: where a quantized model departs from FP.

Temporal features (TFMQ-DM) are the outputs of the modules that turn the timestep (and a fixed
condition) into per-block modulation: every ResNet block's `time_emb_proj` in a diffusers UNet, the
adaLN modulation linears (`transformer_blocks.<i>.norm1.linear`, `proj_out_1`) in a DiT. They depend
on t and the condition only, so one denoiser call per timestep on a dummy x captures them. Hooks go
on module *names*: after quantization the module at a name may be a wrapper (QuantLayer) or a
replacement (cached features), and whatever sits there is what the block consumes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch

from harness.models.base import DiffusionModel, denoise

TEMPORAL_MODULE_PATTERNS = (
    r"(^|.*\.)time_emb_proj",  # diffusers ResnetBlock2D (UNet2DModel, UNet2DConditionModel)
    r"(^|.*\.)transformer_blocks\.\d+\.norm1\.linear",  # DiT AdaLayerNormZero modulation
    r"proj_out_1",  # DiT final-layer adaLN modulation
)
_TEMPORAL_RE = re.compile("|".join(f"(?:{p})" for p in TEMPORAL_MODULE_PATTERNS))


def temporal_module_names(net: torch.nn.Module) -> list[str]:
    """Names of the modules whose outputs are temporal features, in network order."""
    return [name for name, _ in net.named_modules() if _TEMPORAL_RE.fullmatch(name)]


@torch.no_grad()
def capture_temporal_features(model: DiffusionModel, timesteps: list[int], cond: torch.Tensor | None = None,
                              names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{module name: (T, D)} temporal features at each of `timesteps`.

    `cond` is a batch of B conditions (labels (B,) for class-conditional models, embeddings
    (B, *cond_shape) for text models); each row then holds the B conditions' features concatenated
    (D = B * width). None means the model's null condition (the CFG unconditional branch; nothing
    for unconditional models). `names` overrides the discovered modules (e.g. a TIB's features).
    """
    if not timesteps:
        raise ValueError("capture_temporal_features needs at least one timestep")
    net = model.net
    names = temporal_module_names(net) if names is None else names
    if not names:
        raise ValueError(f"{model.name}: no temporal modules found (looked for {TEMPORAL_MODULE_PATTERNS}); "
                         "is this a diffusers UNet or DiT?")
    cond = model.null_cond(1) if cond is None else cond
    batch = 1 if cond is None else len(cond)
    device = next(net.parameters()).device
    cond = None if cond is None else cond.to(device)
    x = torch.zeros(batch, *model.sample_shape, device=device)
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook(name: str) -> Callable[[torch.nn.Module, tuple, torch.Tensor], None]:
        def fn(_m: torch.nn.Module, _i: tuple, out: torch.Tensor) -> None:
            captured[name].append(out.detach().float().reshape(1, -1).cpu())
        return fn

    handles = [net.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for t in timesteps:
            denoise(model, x, torch.full((batch,), int(t), dtype=torch.long, device=device), cond)
    finally:
        for h in handles:
            h.remove()
    bad = [n for n, v in captured.items() if len(v) != len(timesteps)]
    if bad:
        raise RuntimeError(f"temporal modules ran {[len(captured[n]) for n in bad]} times for "
                           f"{len(timesteps)} timesteps: {bad[:3]}")
    return {n: torch.cat(v) for n, v in captured.items()}


def temporal_feature_error(fp: dict[str, torch.Tensor],
                           q: dict[str, torch.Tensor]) -> tuple[list[float], dict[str, list[float]]]:
    """Relative L2 error ||q - fp|| / ||fp|| per timestep: (mean over blocks, {block: per timestep})."""
    if set(fp) != set(q):
        raise KeyError(f"temporal features name different modules: only FP {sorted(set(fp) - set(q))[:3]}, "
                       f"only quantized {sorted(set(q) - set(fp))[:3]}")
    per_block: dict[str, list[float]] = {}
    for name, ref in fp.items():
        if ref.shape != q[name].shape:
            raise ValueError(f"{name}: FP features {tuple(ref.shape)} vs quantized {tuple(q[name].shape)}")
        err = (q[name].double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1).clamp_min(1e-12)
        per_block[name] = err.tolist()
    mean = torch.tensor(list(per_block.values())).mean(dim=0)
    return mean.tolist(), per_block


def trajectory_error(fp_traj: torch.Tensor, q_traj: torch.Tensor) -> list[float]:
    """MSE between FP and quantized sampler states at each step; trajectories are (S, N, C, H, W)."""
    if fp_traj.shape != q_traj.shape:
        raise ValueError(f"trajectories differ in shape: FP {tuple(fp_traj.shape)} vs quantized {tuple(q_traj.shape)}")
    diff = fp_traj.double() - q_traj.double()
    return diff.pow(2).flatten(1).mean(dim=1).tolist()


# PSNR of 8-bit images is bounded: a difference below the quantization noise of one 8-bit level
# (variance step^2 / 12, step = range / 255) does not survive a saved image. Per-image MSE is floored
# there, so identical images (a perfect W8A8 run through a VQ decoder) record this ceiling, not inf.
PSNR_CEILING_DB = 10 * math.log10(12 * 255**2)


def per_image_psnr(fp_images: torch.Tensor, q_images: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR (dB) of each quantized image against its FP twin (images in [-1, 1], range 2), at most
    PSNR_CEILING_DB."""
    if fp_images.shape != q_images.shape:
        raise ValueError(f"image sets differ in shape: {tuple(fp_images.shape)} vs {tuple(q_images.shape)}")
    mse = (fp_images.double() - q_images.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min((data_range / 255) ** 2 / 12))


def psnr(fp_images: torch.Tensor, q_images: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean per-image PSNR (dB) of quantized vs FP samples."""
    return float(per_image_psnr(fp_images, q_images, data_range).mean())
