"""The model zoo: every shipped yaml validates, tiny families run, bad configs fail by key name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from omegaconf import OmegaConf

from harness.models.base import DiffusionModel, denoise
from harness.models.layout import WEIGHTS_DIR
from harness.models.zoo import MODELS, check_model_config, load_model

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
YAMLS = sorted(CONF.glob("*.yaml"))
TINY = ["tiny_unet", "tiny_unet_cond", "tiny_sd", "tiny_dit"]
BUILTIN = ["ddpm_mnist", "ddpm_mnist_cond"]


def cfg_of(name: str, **override) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg.update(override)
    return cfg


def some_cond(model: DiffusionModel, batch: int) -> torch.Tensor | None:
    if model.num_classes is not None:
        return torch.arange(batch) % model.num_classes
    if model.cond_shape is not None:
        return torch.randn(batch, *model.cond_shape)
    return None


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_every_yaml_validates_and_its_scheduler_builds(path: Path) -> None:
    cfg = OmegaConf.load(path)
    check_model_config(cfg)
    assert cfg.name == path.stem, "config file name = model name"
    for key in ("name", "family", "sample_shape", "num_classes", "cond_shape", "guidance_scale", "dataset",
                "scheduler"):
        assert key in cfg, f"{path.name} lacks {key}"
    if cfg.scheduler is not None:
        sched = OmegaConf.to_container(cfg.scheduler)
        assert DDPMScheduler.from_config(sched).config.num_train_timesteps == 1000
        assert DDIMScheduler.from_config(sched).config.beta_schedule == sched["beta_schedule"]


def test_every_family_has_a_yaml_and_the_required_ones_exist() -> None:
    used = {OmegaConf.load(p).family for p in YAMLS}
    assert used == set(MODELS.names())
    names = {p.stem for p in YAMLS}
    assert {"ddpm_mnist", "ddpm_mnist_cond", "ddpm_cifar10", "sd_unet", "dit", *TINY} <= names


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_and_denoise(name: str) -> None:
    state = torch.get_rng_state()
    model = load_model(cfg_of(name))
    assert torch.equal(state, torch.get_rng_state()), "building a model must not move the global RNG"
    n_params = sum(p.numel() for p in model.net.parameters())
    assert 10_000 < n_params < 100_000 and max(model.sample_shape[1:]) <= 16
    assert model.source == "random(seed=0)" and model.extra["scheduler_source"] == "model.scheduler"
    assert not model.net.training, "nets come back in eval mode (DiT drops labels in train mode)"
    x, t = torch.randn(3, *model.sample_shape), torch.tensor([0, 500, 999])
    with torch.no_grad():
        out = denoise(model, x, t, some_cond(model, 3))
        out_null = denoise(model, x, t, model.null_cond(3))
    assert out.shape == x.shape and torch.isfinite(out).all() and out.std() > 0
    if model.is_conditional:
        assert not torch.allclose(out, out_null), "the condition must reach the output"
    DDIMScheduler.from_config(model.scheduler_config)


def test_random_init_is_seeded() -> None:
    a, b = load_model(cfg_of("tiny_unet")), load_model(cfg_of("tiny_unet"))
    c = load_model(cfg_of("tiny_unet", seed=1))
    wa, wb, wc = (m.net.conv_in.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"pth": "/x"}, "model.pth"),
        ({"family": "unet2d"}, "model.family"),
        ({"sample_shape": [16, 16]}, "model.sample_shape"),
        ({"num_classes": 0}, "model.num_classes"),
        ({"guidance_scale": 3.0}, "model.guidance_scale"),
        ({"dataset": "cifar"}, "model.dataset"),
        ({"init": "scratch"}, "model.init"),
        ({"arch": None}, "model.arch"),
        ({"scheduler": "ddpm"}, "model.scheduler"),
        ({"weights": "ddpm_cifar10"}, "model.weights"),
        ({"cond_shape": [4, 16]}, "model.cond_shape"),
        ({"init": "pretrained"}, "model.path"),
        ({"decoder": "vqgan", "image_shape": [1, 32, 32]}, "model.decoder"),
        ({"decoder": "vae"}, "model.image_shape"),
        ({"image_shape": [3, 16, 16]}, "model.image_shape"),
        ({"text_encoder": "clip"}, "model.text_encoder"),
    ],
)
def test_bad_config_names_the_key(override: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_model_config(cfg_of("tiny_unet", **override))


def test_a_pretrained_text_model_needs_its_text_encoder() -> None:
    with pytest.raises(ValueError, match=r"model\.text_encoder=None.*zero-filled text states mean nothing"):
        check_model_config(cfg_of("sd_unet", text_encoder=None))
    check_model_config(cfg_of("tiny_sd"))  # a random denoiser alone is fine (architecture benchmarks)


@pytest.mark.parametrize("name", ["ldm_mnist", "dit_mnist"])
def test_missing_shipped_latent_folders_say_how_to_train_them(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harness.models.layout.WEIGHTS_DIR", tmp_path)
    family = "unet" if name == "ldm_mnist" else "dit"
    cfg = {**cfg_of("ddpm_mnist"), "name": name, "weights": name, "family": family, "sample_shape": [4, 7, 7],
           "decoder": "vae", "image_shape": [1, 28, 28], "num_classes": None if family == "unet" else 10}
    stage = "ldm" if name == "ldm_mnist" else "dit"
    with pytest.raises(FileNotFoundError, match=rf"train it with `.*train_latent --stage {stage}`"):
        load_model(cfg)


def test_bad_keys_get_a_suggestion_and_arch_typos_are_caught() -> None:
    with pytest.raises(ValueError, match=r"Did you mean model\.path\?"):
        check_model_config(cfg_of("tiny_unet", pth="/x"))
    arch = cfg_of("tiny_unet")["arch"] | {"block_out_channel": [8, 16]}
    with pytest.raises(ValueError, match=r"model\.arch\.block_out_channel .*Did you mean block_out_channels"):
        check_model_config(cfg_of("tiny_unet", arch=arch))
    arch = cfg_of("tiny_unet")["arch"] | {"in_channels": 3}
    with pytest.raises(ValueError, match=r"model\.arch.*sample_shape\[0\]=1"):
        check_model_config(cfg_of("tiny_unet", arch=arch))


def test_missing_local_path_says_what_to_provide(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*nowhere.*does not exist.*diffusers folder"):
        load_model(cfg_of("ddpm_mnist", path=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"no config\.json.*model\.path=/path/to/folder"):
        load_model(cfg_of("ddpm_mnist", path=str(tmp_path)))


def test_unreachable_hub_id_says_where_it_looked() -> None:
    cfg = cfg_of("ddpm_cifar10", hub_id="nobody/no-such-model-xyz", local_files_only=True)
    with pytest.raises(OSError, match=r"hub cache.*model\.path=/path/to/folder"):
        load_model(cfg)


def _saved_tiny(root: Path, pipeline: bool) -> DiffusionModel:
    model = load_model(cfg_of("tiny_unet", seed=7))
    model.net.save_pretrained(root / "unet" if pipeline else root, safe_serialization=True)
    if pipeline:
        sched = DDPMScheduler(num_train_timesteps=500, beta_schedule="linear")
        sched.save_pretrained(root / "scheduler")
    return model


@pytest.mark.parametrize("pipeline", [False, True], ids=["flat", "pipeline"])
def test_local_folder_overrides_and_keeps_its_scheduler(tmp_path: Path, pipeline: bool) -> None:
    saved = _saved_tiny(tmp_path, pipeline)
    model = load_model(cfg_of("tiny_unet", init="pretrained", path=str(tmp_path)))
    assert model.source == f"path:{tmp_path}"
    assert torch.equal(model.net.conv_in.weight, saved.net.conv_in.weight)
    if pipeline:  # the folder's scheduler wins over the yaml's, and the record says so
        assert model.scheduler_config["num_train_timesteps"] == 500
        assert model.extra["scheduler_source"].endswith("scheduler_config.json")
    else:
        assert model.scheduler_config["num_train_timesteps"] == 1000
        assert model.extra["scheduler_source"] == "model.scheduler"


def test_folder_of_another_family_or_shape_is_refused(tmp_path: Path) -> None:
    _saved_tiny(tmp_path, pipeline=False)
    with pytest.raises(ValueError, match=r"holds a UNet2DModel.*model\.family=dit"):
        load_model(cfg_of("tiny_dit", init="pretrained", path=str(tmp_path), arch=None))
    with pytest.raises(ValueError, match=r"model\.sample_shape"):
        load_model(cfg_of("tiny_unet", init="pretrained", path=str(tmp_path), arch=None,
                          sample_shape=[1, 28, 28]))


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_weights_load(name: str) -> None:
    folder = WEIGHTS_DIR / name
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        pytest.skip(f"{folder} not trained yet (python -m harness.models.train --name {name})")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    meta = json.loads((folder / "training.json").read_text())
    assert meta["step"] > 0 and meta["loss_curve"]
    model = load_model(cfg_of(name))
    assert model.source == "built-in" and model.dataset == "mnist"
    assert model.scheduler_config["num_train_timesteps"] == 1000
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out = denoise(model, x, torch.tensor([10, 900]), some_cond(model, 2))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_training_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The one-time training script: seeded, and a killed-then-resumed run ends where a straight one does."""
    from safetensors.torch import load_file

    from harness.models.train import main

    common = ["--name", "ddpm_mnist_cond", "--steps", "4", "--batch", "4", "--warmup", "2", "--ckpt-every", "2"]
    main([*common, "--out", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "ca")])
    main([*common, "--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "cb"), "--max-steps-this-run", "3"])
    assert json.loads((tmp_path / "b" / "training.json").read_text())["step"] == 3
    main([*common, "--out", str(tmp_path / "b"), "--ckpt-dir", str(tmp_path / "cb")])
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "b" / "training.json").read_text())
    assert meta["finished"] and meta["step"] == 4 and meta["resumes"][0]["step"] == 3
    assert [s for s, _ in meta["loss_curve"]] == [3, 4]
    model = load_model(cfg_of("ddpm_mnist_cond", path=str(tmp_path / "a")))
    assert model.num_classes == 10 and model.net.class_embedding.num_embeddings == 11
