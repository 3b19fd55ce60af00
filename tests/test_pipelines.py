"""Real-model pipelines on tiny random folders (issue 12.1/12.5, 14.1/14.2): every method on every family,
decoded images everywhere, prompts encoded once, and loads that refuse broken folders before sampling."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits

from harness.artifacts import ArtifactCache
from harness.calibration import CALIB_SEED_OFFSET
from harness.config import SamplerConfig
from harness.identity import run_identity
from harness.metrics.features import build_extractor, images_to_features
from harness.models.base import denoise
from harness.models.conditions import bind_prompts, read_prompts
from harness.models.layout import weights_fingerprint
from harness.models.tiny import KINDS, SCHEDULER, UNET_CIN, build
from harness.models.zoo import load_model
from harness.run_id import run_id
from harness.runner import run
from harness.sampling import sample
from harness.store import ResultsStore

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = ("fp", "rtn", "ptq4dm", "qdiff", "tfmq")
# Smallest recipes that still run every stage of each method (calibration, reconstruction, TIAR, FSC).
RECIPE = {"iters": 1, "act_iters": 1, "calib_rows": 4, "n_steps": 1, "samples_per_step": 2, "fsc_samples_per_step": 2,
          "tiar_iters": 1, "tiar_batch_size": 4, "batch_size": 4, "capture_batch_size": 8}
PROMPTS = ["a cat", "a dog", "the dog of a cat", "zebra", "cat cat"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a shared 2-core machine intra-op threads
    oversubscribed by other processes made a 2 s run take 80 s (measured); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # numpy / scipy BLAS of the metrics, likewise
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    out = {kind: build(kind, root / kind) for kind in KINDS}
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = root / "prompts.txt"
    return out


def model_cfg(kind: str, path: Path) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"tiny_{kind}.yaml")), "path": str(path)}


def run_cfg(tmp: Path, kind: str, folder: Path, prompts: Path, method: str, *extra: str):
    recipe = [] if method == "fp" else [
        f"method.recipes.quick.{k}={v}" for k, v in RECIPE.items()
        if k in OmegaConf.load(CONF / "method" / f"{method}.yaml").recipes.quick]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"model=tiny_{kind}", f"model.path={folder}", f"method={method}", "bits=w4a8", "eval=smoke",
            "eval.n_samples=4", "eval.batch_size=4", "eval.n_trajectory=1", "eval.grid=2",
            "eval.latency.batch_sizes=[1]", "eval.latency.warmup=0", "eval.latency.iters=1",
            "eval.extractor=none", f"+eval.prompts={prompts}", "logger=none",
            "sampler.steps=2", "calibration.n_samples=2", "calibration.batch_size=4",
            f"paths.store={tmp / 'store'}", f"paths.artifacts={tmp / 'artifacts'}", f"paths.outputs={tmp / 'out'}",
            *recipe, *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_runs_on_every_pipeline(tmp_path: Path, pipelines: dict[str, Path], kind: str) -> None:
    records = [run(run_cfg(tmp_path, kind, pipelines[kind], pipelines["prompts"], m)) for m in METHODS]
    for rec in records:
        assert rec.status == "finished", f"{kind}/{rec.method}: {rec.error}\n{rec.traceback}"
        model = rec.report["model"]
        assert model["quantized"] == "denoiser only" and model["decoder"]["precision"] == "fp"
        c, h, w = model["image_shape"]
        assert model["image_shape"] == model_cfg(kind, pipelines[kind])["image_shape"]
        assert Image.open(rec.artifacts["grid"]).size == (w + 2, 2 * h + 3), "the grid shows decoded images"
        assert len(rec.curves["trajectory_error"]) == 2, "trajectories stay in latent space, one entry per step"
    quantized = [r for r in records if r.method != "fp"]
    assert all(0 < r.metrics["weight_bytes"] < r.metrics["fp32_weight_bytes"] for r in quantized)
    builds = [b for r in ResultsStore(tmp_path / "store").records() for b in r.report.get("artifact_builds", [])]
    assert builds.count("prompt_embeddings") == (1 if kind == "t2i" else 0), builds
    assert builds.count("fp_samples") == 1, "the FP reference (decoded) is built once and shared"


def test_quality_metrics_see_decoded_images(tmp_path: Path, pipelines: dict[str, Path]) -> None:
    """LeNet takes 1x28x28 images only, and the DiT samples 4x14x14 latents: the metrics saw decoded
    samples, labelled with the eval seed's labels (class accuracy)."""
    rec = run(run_cfg(tmp_path, "dit_vae", pipelines["dit_vae"], pipelines["prompts"], "rtn", "eval.extractor=lenet"))
    assert rec.status == "finished", rec.traceback
    fp = next(r for r in ResultsStore(tmp_path / "store").records() if r.method == "fp")
    assert fp.status == "finished" and fp.metrics["fid"] == pytest.approx(0.0, abs=1e-3), "FP vs its own samples"
    assert rec.metrics["fid"] > 0 and 0 <= rec.metrics["class_accuracy"] <= 1


def test_prompt_embeddings_are_built_once_and_the_null_is_the_empty_prompt(
        tmp_path: Path, pipelines: dict[str, Path]) -> None:
    cache = ArtifactCache(tmp_path / "artifacts")
    model = load_model(model_cfg("t2i", pipelines["t2i"]))
    with pytest.raises(ValueError, match=r"eval\.prompts"):
        bind_prompts(model.conditions, None, "caption", cache)
    bind_prompts(model.conditions, str(pipelines["prompts"]), "caption", cache)
    again = load_model(model_cfg("t2i", pipelines["t2i"]))
    bind_prompts(again.conditions, str(pipelines["prompts"]), "caption", cache)
    assert cache.builds == ["prompt_embeddings"], "the second model reuses the cached encodings"
    src = again.conditions
    assert src.prompts == PROMPTS and src.embeddings.shape == (len(PROMPTS), 8, 16)
    assert torch.allclose(src.embeddings, model.conditions.encode(PROMPTS), atol=1e-6)
    null = again.null_cond(3)
    assert null.shape == (3, 8, 16) and null.abs().sum() > 0, "the null condition is the encoded '', not zeros"
    assert torch.allclose(null[0], model.conditions.encode([""])[0], atol=1e-6)
    # a changed prompt file is a new artifact (content-addressed), not a stale reuse
    other = tmp_path / "other.txt"
    other.write_text("zebra\n")
    bind_prompts(again.conditions, str(other), "caption", cache)
    assert cache.builds == ["prompt_embeddings"] * 2 and again.conditions.prompts == ["zebra"]


def test_samples_are_decoded_and_carry_latents(pipelines: dict[str, Path]) -> None:
    for kind in ("ldm_vq", "dit_vae"):
        model = load_model(model_cfg(kind, pipelines[kind]))
        s = sample(model, SamplerConfig("ddim", 2, 0.0), 3, 2, seed=0, n_trajectory=2)
        assert s.images.shape == (3, *model.image_shape) and s.images.abs().max() <= 1
        assert s.latents.shape == (3, *model.sample_shape) and s.trajectory.shape == (2, 2, *model.sample_shape)
        assert torch.allclose(s.images, model.decode(s.latents), atol=1e-5)
        if kind == "dit_vae":  # labels drawn with the eval seed, the same for every run and shard
            assert s.conds.tolist() == model.conditions.draw(0, 0, 3).tolist()
            shard = sample(model, SamplerConfig("ddim", 2, 0.0), 1, 2, seed=0, offset=2)
            assert torch.allclose(shard.images, s.images[2:], atol=1e-5)


def _copy(pipelines: dict[str, Path], kind: str, tmp: Path) -> Path:
    return Path(shutil.copytree(pipelines[kind], tmp / kind))


@pytest.mark.parametrize(("kind", "part"), [("ldm_kl", "vae"), ("ldm_vq", "vqvae"), ("t2i", "text_encoder"),
                                            ("t2i", "tokenizer"), ("dit_vae", "transformer"),
                                            ("ldm_cin", "class_embedder")])
def test_a_missing_part_fails_at_load_naming_the_subfolder(tmp_path: Path, pipelines: dict[str, Path],
                                                           kind: str, part: str) -> None:
    folder = _copy(pipelines, kind, tmp_path)
    shutil.rmtree(folder / part)
    with pytest.raises(FileNotFoundError, match=rf"{part}/"):
        load_model(model_cfg(kind, folder))


def test_a_run_with_a_missing_decoder_fails_before_sampling(tmp_path: Path, pipelines: dict[str, Path]) -> None:
    folder = _copy(pipelines, "ldm_kl", tmp_path)
    shutil.rmtree(folder / "vae")
    rec = run(run_cfg(tmp_path, "ldm_kl", folder, pipelines["prompts"], "rtn"))
    assert rec.status == "failed" and "vae/" in rec.error
    assert not (tmp_path / "artifacts" / "calibration").exists(), "nothing was sampled"


def _edit_tensors(file: Path, drop: str, add: str) -> None:
    tensors = load_file(file)
    del tensors[drop]
    tensors[add] = torch.zeros(2)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(("kind", "part", "file"), [
    ("ldm_kl", "unet", "diffusion_pytorch_model.safetensors"),
    ("ldm_kl", "vae", "diffusion_pytorch_model.safetensors"),
    ("t2i", "text_encoder", "model.safetensors"),
])
def test_missing_or_unexpected_tensors_fail_the_load_naming_them(tmp_path: Path, pipelines: dict[str, Path],
                                                                 kind: str, part: str, file: str) -> None:
    folder = _copy(pipelines, kind, tmp_path)
    path = folder / part / file
    victim = sorted(load_file(path))[1]
    before = weights_fingerprint(model_cfg(kind, folder))
    _edit_tensors(path, victim, "not_in_the_model.weight")
    assert weights_fingerprint(model_cfg(kind, folder)) != before, "every loaded part is in the run identity"
    with pytest.raises(ValueError, match=rf"1 missing tensors: {victim}.*1 unexpected tensors: not_in_the_model"):
        load_model(model_cfg(kind, folder))


@pytest.mark.parametrize("part", ["unet", "vae"])
def test_a_config_without_class_name_is_refused(tmp_path: Path, pipelines: dict[str, Path], part: str) -> None:
    folder = _copy(pipelines, "ldm_kl", tmp_path)
    config = json.loads((folder / part / "config.json").read_text())
    del config["_class_name"]
    (folder / part / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{part}/config\.json has no _class_name"):
        load_model(model_cfg("ldm_kl", folder))


def test_a_decoder_of_the_wrong_shape_is_refused(pipelines: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"decodes \[4, 14, 14\] latents to \[1, 28, 28\].*model\.image_shape"):
        load_model({**model_cfg("ldm_kl", pipelines["ldm_kl"]), "image_shape": [3, 28, 28]})


def test_a_nan_weight_fails_the_run_naming_the_sampler_step(tmp_path: Path, pipelines: dict[str, Path]) -> None:
    folder = _copy(pipelines, "ldm_kl", tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    rec = run(run_cfg(tmp_path, "ldm_kl", folder, pipelines["prompts"], "rtn"))
    assert rec.status == "failed" and rec.error.startswith("NonFiniteError")
    assert "sampler step 1/2 (t=" in rec.error, rec.error
    assert not any(r.status == "finished" for r in ResultsStore(tmp_path / "store").records())


def test_inception_takes_the_decoded_rgb_images(pipelines: dict[str, Path]) -> None:
    """3-channel decoded images go through the Inception path (random weights: the numbers mean nothing)."""
    model = load_model(model_cfg("ldm_vq", pipelines["ldm_vq"]))
    images = sample(model, SamplerConfig("ddim", 2, 0.0), 2, 2, seed=0).images
    feats = images_to_features(build_extractor("inception", random_init=True), images, 2, progress=False)
    assert feats.pooled.shape == (2, 2048) and torch.isfinite(feats.pooled).all()


def test_prompt_files_txt_csv_coco_json_and_records(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    (tmp_path / "p.csv").write_text('id,caption\n1,"a cat, sitting"\n2,a dog\n')
    coco = {"images": [], "annotations": [{"image_id": 1, "id": 7, "caption": "a cat"}, {"caption": "a dog"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    (tmp_path / "records.json").write_text(json.dumps([{"text": "a cat"}, {"text": "a dog"}]))
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.csv") == ["a cat, sitting", "a dog"]
    assert read_prompts(tmp_path / "coco.json") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "records.json", column="text") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match=r"no column 'prompt'.*\['id', 'caption'\]"):
        read_prompts(tmp_path / "p.csv", column="prompt")
    with pytest.raises(ValueError, match=r"lacks the column 'caption'"):
        read_prompts(tmp_path / "records.json")
    with pytest.raises(FileNotFoundError, match=r"eval\.prompts="):
        read_prompts(tmp_path / "missing.txt")


def test_eval_and_calibration_draw_different_seeded_prompt_subsets(pipelines: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(model_cfg("t2i", pipelines["t2i"]))
    bind_prompts(model.conditions, str(pipelines["prompts"]), "caption", ArtifactCache(tmp_path))
    eval_ids = model.conditions.draw(0, 0, len(PROMPTS))
    assert sorted(eval_ids.tolist()) == list(range(len(PROMPTS))), "every prompt once before any repeats"
    assert torch.equal(model.conditions.draw(0, 2, 3), eval_ids[2:]), "a shard draws exactly its slice"
    calib_ids = model.conditions.draw(0 + CALIB_SEED_OFFSET, 0, len(PROMPTS))
    assert not torch.equal(calib_ids, eval_ids)


def test_an_edited_prompt_file_is_a_new_run(tmp_path: Path, pipelines: dict[str, Path]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    raw = OmegaConf.to_container(run_cfg(tmp_path, "t2i", pipelines["t2i"], prompts, "fp"), resolve=True)
    first = run_id(run_identity(raw))
    assert run_id(run_identity(raw)) == first
    prompts.write_text("a dog\n")
    assert run_id(run_identity(raw)) != first, "same path, other prompts: never a stale resume"


@torch.no_grad()
def test_decoders_use_the_checkpoint_scaling_factor_and_the_vq_codebook(pipelines: dict[str, Path]) -> None:
    kl = load_model(model_cfg("ldm_kl", pipelines["ldm_kl"]))
    z = torch.randn(2, *kl.sample_shape)
    assert kl.decoder.scaling_factor == 0.5, "read from vae/config.json, not the SD default 0.18215"
    assert torch.allclose(kl.decode(z), kl.decoder.net.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)
    vq = load_model(model_cfg("ldm_vq", pipelines["ldm_vq"]))
    z = torch.randn(2, *vq.sample_shape)
    quantized = vq.decoder.net.decode(z / 0.8).sample.clamp(-1, 1)
    unquantized = vq.decoder.net.decode(z / 0.8, force_not_quantize=True).sample.clamp(-1, 1)
    assert torch.allclose(vq.decode(z), quantized, atol=1e-6) and not torch.allclose(quantized, unquantized)


@torch.no_grad()
def test_class_context_labels_and_the_null_class_under_guidance(pipelines: dict[str, Path]) -> None:
    """ImageNet-LDM style: labels drawn with the eval seed, embedded by the folder's class embedder into a
    1-token context; the CFG branch gets the null class's embedding (row num_classes), never zeros."""
    model = load_model(model_cfg("ldm_cin", pipelines["ldm_cin"]))
    table = model.conditions.embedder.embedding.weight
    assert model.num_classes is None and model.conditions.num_classes == 10 and table.shape == (11, 16)
    seen = []
    s = sample(model, SamplerConfig("ddim", 2, 0.0), 3, 3, seed=0, on_step=lambda x, t, c: seen.append(c))
    assert s.images.shape == (3, 3, 16, 16) and s.latents.shape == (3, 3, 8, 8)
    assert s.conds.tolist() == model.conditions.draw(0, 0, 3).tolist() and s.conds.max() < 10
    cond, null = seen[0].chunk(2)
    assert cond.shape == (3, 1, 16) and torch.equal(cond[:, 0], table[s.conds])
    assert torch.equal(null[:, 0], table[10].expand(3, -1)), "the guidance branch is the null class"
    assert model.conditions.key()["embedder"], "the embedder's weights are part of every FP artifact's key"


def _drop_scaling_factor(folder: Path, part: str) -> None:
    config = json.loads((folder / part / "config.json").read_text())
    del config["scaling_factor"]
    (folder / part / "config.json").write_text(json.dumps(config))


@torch.no_grad()
def test_a_decoder_without_its_scaling_factor_needs_it_from_the_config(tmp_path: Path,
                                                                      pipelines: dict[str, Path]) -> None:
    """CompVis/ldm-celebahq-256's vqvae/config.json declares no scaling_factor: diffusers would use 0.18215."""
    with pytest.raises(ValueError, match=r"declares scaling_factor=0.8, but model.decoder_scaling_factor=1.0"):
        load_model({**model_cfg("ldm_vq", pipelines["ldm_vq"]), "decoder_scaling_factor": 1.0})
    folder = _copy(pipelines, "ldm_vq", tmp_path)
    _drop_scaling_factor(folder, "vqvae")
    with pytest.raises(ValueError, match=r"declares no scaling_factor .*set model.decoder_scaling_factor"):
        load_model(model_cfg("ldm_vq", folder))
    model = load_model({**model_cfg("ldm_vq", folder), "decoder_scaling_factor": 1.0})
    assert model.decoder.scaling_factor == 1.0
    assert model.describe()["decoder"]["scaling_factor_from"] == "model.decoder_scaling_factor"
    z = torch.randn(2, *model.sample_shape)
    assert torch.allclose(model.decode(z), model.decoder.net.decode(z).sample.clamp(-1, 1), atol=1e-6)


def test_the_folder_config_wins_over_model_arch_and_the_record_says_so(pipelines: dict[str, Path]) -> None:
    arch = {"in_channels": 3, "sample_size": 8, "block_out_channels": [8, 32]}
    model = load_model({**model_cfg("ldm_vq", pipelines["ldm_vq"]), "arch": arch})
    assert list(model.net.config.block_out_channels) == [8, 16], "the checkpoint's architecture runs"
    assert model.extra["arch_differs"] == {"block_out_channels": {"yaml": [8, 32], "loaded": [8, 16]}}


@torch.no_grad()
def test_a_random_class_context_model_builds_its_own_embedder() -> None:
    """model.init=random (cost estimates of ldm_cin256): a seeded random class embedder, nothing loaded."""
    cfg = {**model_cfg("ldm_cin", Path("unused")), "init": "random", "path": None, "arch": UNET_CIN,
           "scheduler": SCHEDULER}
    model = load_model(cfg)
    assert model.extra["class_embedder"].startswith("random") and model.decoder is None
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([10, 900])
    labels = model.conditions.embed(torch.tensor([1, 2]))
    assert not torch.allclose(denoise(model, x, t, labels), denoise(model, x, t, model.null_cond(2)))
    assert torch.equal(load_model(cfg).conditions.embedder.embedding.weight, model.conditions.embedder.embedding.weight)
