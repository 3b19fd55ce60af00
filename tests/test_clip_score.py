"""CLIP score with the user's CLIP folder: here a random tiny CLIP built offline."""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from harness.metrics.clip_score import clip_score, sample_prompts

torch.set_num_threads(1)
WORDS = ["a", "cat", "dog", "red", "photo", "of"]


def _tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters plus a few whole words (vocab.json / merges.txt)."""
    letters = sorted(set("".join(WORDS)))
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("r", "e"), ("re", "d</w>"), ("o", "f</w>")]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), *("".join(m) for m in merges)]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                         model_max_length=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip")
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    text = {"vocab_size": len(tokenizer.get_vocab()), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder, safe_serialization=True)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _expected(folder: Path, images: torch.Tensor, prompts: list[str]) -> float:
    """100 * max(cos, 0) averaged, one (image, prompt) pair at a time, from CLIP's own logits."""
    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    x = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    scores = []
    for img, prompt in zip(x, prompts, strict=True):
        with torch.no_grad():
            out = model(**proc(text=[prompt], images=[img], return_tensors="pt"))
            scores.append(max(0.0, 100 * float(out.logits_per_image[0, 0] / model.logit_scale.exp())))
    return sum(scores) / len(scores)


def test_clip_score_of_images_and_their_prompts(clip_folder: Path) -> None:
    images = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a photo of a cat", "a red dog", "a cat", "a dog", "a red cat"]
    score = clip_score(images, prompts, clip_folder, batch_size=2)
    assert 0 <= score <= 100
    assert score == pytest.approx(_expected(clip_folder, images, prompts), abs=1e-3)
    grey = images[:, :1]  # grayscale samples are scored as RGB
    assert clip_score(grey, prompts, clip_folder) == pytest.approx(clip_score(grey.expand(-1, 3, -1, -1), prompts,
                                                                              clip_folder), abs=1e-5)


def test_prompts_per_sample_and_clear_errors(clip_folder: Path, tmp_path: Path) -> None:
    class Source:  # what a prompt condition source exposes: the prompt list that Samples.conds index
        prompts = ["a cat", "a dog", "a red dog"]

    assert sample_prompts(Source(), torch.tensor([2, 0, 2])) == ["a red dog", "a cat", "a red dog"]
    with pytest.raises(ValueError, match="the model is not conditioned on prompts"):
        sample_prompts(None, torch.tensor([0]))
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(torch.zeros(2, 3, 8, 8), ["a cat"], clip_folder)
    with pytest.raises(FileNotFoundError, match="is not a transformers CLIP folder"):
        clip_score(torch.zeros(1, 3, 8, 8), ["a cat"], tmp_path)


def test_text_to_image_run_records_clip_score(clip_folder: Path, tmp_path: Path) -> None:
    """End to end: a tiny text-to-image pipeline samples decoded images for its prompts and the run's
    record carries their CLIP score against those prompts."""
    from hydra import compose, initialize_config_dir

    from harness.models.tiny import build
    from harness.runner import run

    pipeline = build("t2i", tmp_path / "t2i")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na red dog\n")
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=tiny_t2i", f"model.path={pipeline}", "method=fp", "eval=smoke", "logger=none", "sampler.steps=2",
            "eval.temporal=false", f"++eval.prompts={prompts}", f"eval.clip_model={clip_folder}",
            f"paths.store={tmp_path / 'store'}", f"paths.artifacts={tmp_path / 'artifacts'}",
            f"paths.outputs={tmp_path / 'out'}"])
    rec = run(cfg)
    assert rec.status == "finished", rec.traceback
    assert 0 <= rec.metrics["clip_score"] <= 100
