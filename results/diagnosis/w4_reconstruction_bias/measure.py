"""Where the W4 brightness drift comes from: per-timestep structure of the noise-prediction error.

    python results/diagnosis/w4_reconstruction_bias/measure.py [--n 1000] [--states 128]

For each quantized model (RTN / Q-Diffusion / TFMQ-DM, W4A8 and Q-Diffusion W4A32, quick recipes,
seed 0) it reports, over all `--n` eval samples (same noise as the FP artifact), the mean pixel
intensity and ink fraction against FP, and on the FP trajectory states of `--states` samples, per
timestep, the error of the predicted noise e = eps_q - eps_fp split PTQD-style into a part
correlated with eps_fp (e = k * eps_fp + r; k by least squares) and the rest:
k, and the share of |e|^2 that k * eps_fp explains. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import methods
from harness.artifacts import ArtifactCache
from harness.config import RunConfig
from harness.models.base import denoise
from harness.models.zoo import load_model
from harness.references import References
from harness.runner import quant_spec, validate
from harness.sampling import sample

CONF = str(Path(__file__).resolve().parents[3] / "conf")
RUNS = {
    "RTN W4A8": ["method=rtn", "bits=w4a8"],
    "Q-Diffusion W4A32": ["method=qdiff", "bits=w4a32"],
    "Q-Diffusion W4A8": ["method=qdiff", "bits=w4a8"],
    "TFMQ-DM W4A8": ["method=tfmq", "bits=w4a8"],
}


def config(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=ddpm_mnist", "logger=none", *overrides])
    return validate(cfg)[0]


@torch.no_grad()
def fp_states(model, rc, n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """(t, x_in, eps_fp) at every sampler step of the FP trajectories of the first n eval samples."""
    states: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def keep(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> None:
        states.append((int(t[0]), x.clone(), denoise(model, x, t, cond)))

    sample(model, rc.sampler, n, n, rc.eval.seed, on_step=keep, desc="FP states")
    return states


def intensity(images: torch.Tensor) -> tuple[float, float]:
    """Mean pixel value in [0, 1] and the fraction of pixels above 0.5 (ink)."""
    x = (images + 1) / 2
    return float(x.mean()), float((x > 0.5).float().mean())


WINDOWS = {"t > 700": (700, 1000), "300 < t <= 700": (300, 700), "t <= 300": (-1, 300)}


@torch.no_grad()
def measure(qm, rq, n: int, states: list, fp_mean: float, fp_ink: float, label: str) -> str:  # noqa: ANN001
    """The table cells of one quantized model: sample intensity vs FP, then k and its share per window."""
    images = sample(qm, rq.sampler, n, rq.eval.batch_size, rq.eval.seed, desc=label).images
    q_mean, q_ink = intensity(images)
    ks: dict[str, list[float]] = {w: [] for w in WINDOWS}
    shares: dict[str, list[float]] = {w: [] for w in WINDOWS}
    for t, x, eps_fp in states:
        err = denoise(qm, x, torch.full((x.shape[0],), t), None) - eps_fp
        k = float((err * eps_fp).sum() / (eps_fp * eps_fp).sum())
        share = float((k * eps_fp).pow(2).sum() / err.pow(2).sum())
        for w, (lo, hi) in WINDOWS.items():
            if lo < t <= hi:
                ks[w].append(k)
                shares[w].append(share)
    cells = [f"{sum(ks[w]) / len(ks[w]):+.4f} | {sum(shares[w]) / len(shares[w]):.2f}" for w in WINDOWS]
    return f"{q_mean / fp_mean - 1:+.1%} | {q_ink / fp_ink - 1:+.1%} | " + " | ".join(cells)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--states", type=int, default=128)
    args = p.parse_args()
    rc = config(["method=fp"])
    model = load_model(rc.model)
    model.net.eval()
    refs = References(rc, model, ArtifactCache(rc.paths["artifacts"]))
    fp_mean, fp_ink = intensity(refs.fp_samples().images[: args.n])
    states = fp_states(model, rc, args.states)
    print(f"FP: mean {fp_mean:.4f}, ink {fp_ink:.4f}; sampler timesteps {states[0][0]}..{states[-1][0]}")
    print("| Run | mean vs FP | ink vs FP | " + " | ".join(f"k ({w}) | share ({w})" for w in WINDOWS) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(WINDOWS))
    for label, overrides in RUNS.items():
        rq = config(overrides)
        qmodel = load_model(rq.model)
        qmodel.net.eval()
        qrefs = References(rq, qmodel, ArtifactCache(rq.paths["artifacts"]))
        torch.manual_seed(rq.seed)
        method = methods.METHODS.get(rq.method["name"])(rq.method, rq.recipe)
        # outside no_grad: reconstruction trains
        qm = method.quantize(qmodel, qrefs.calibration(), quant_spec(rq)).model
        print(f"| {label} | {measure(qm, rq, args.n, states, fp_mean, fp_ink, label)} |", flush=True)


if __name__ == "__main__":
    main()
