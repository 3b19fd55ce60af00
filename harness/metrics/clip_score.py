"""CLIP score of text-to-image samples: how well each decoded image matches its prompt.

CLIPScore = 100 * max(cos(E_image, E_text), 0), averaged over samples: the definition torchmetrics'
`CLIPScore` uses (Hessel et al. 2021, with w = 100). The embeddings are transformers' `CLIPModel`
forward (`image_embeds`, `text_embeds`, both projected and L2-normalised) with the user's CLIP weights
(`eval.clip_model=/path/to/clip`: a CLIPModel + CLIPProcessor folder, e.g. openai/clip-vit-large-patch14
saved locally); nothing is downloaded. torchmetrics itself is not used: its 1.9 `CLIPScore` calls
`get_image_features`, which returns an output object rather than a tensor in transformers 5.
Papers often print the cosine itself (0.306 = 30.6 here).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.metrics.features import to_uint8

if TYPE_CHECKING:  # transformers' CLIP loads only when eval.clip_model is set
    from transformers import CLIPModel, CLIPProcessor


def load_clip(path: str | Path) -> tuple[CLIPModel, CLIPProcessor]:
    """The user's CLIP model and processor from a local folder (a clear error when it is not one)."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"<eval.clip_model={path}> is not a transformers CLIP folder (config.json, weights, "
                                "tokenizer and preprocessor_config.json, as CLIPModel/CLIPProcessor.save_pretrained "
                                "write them)")
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


@torch.no_grad()
def clip_scores(images: torch.Tensor, prompts: list[str], clip_path: str | Path, batch_size: int = 64,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-sample CLIP scores of images (N, C, H, W) in [-1, 1] against their prompts (one per image)."""
    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    model, processor = load_clip(clip_path)
    model.to(device)
    max_length = int(model.config.text_config.max_position_embeddings)
    out = []
    for s in range(0, len(images), batch_size):
        x = to_uint8(images[s : s + batch_size])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        batch = processor(text=prompts[s : s + batch_size], images=list(x), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length)
        emb = model(**{k: v.to(device) for k, v in batch.items()})
        out.append((100 * (emb.image_embeds * emb.text_embeds).sum(-1)).clamp(min=0).float().cpu())
    return torch.cat(out)


def clip_score(images: torch.Tensor, prompts: list[str], clip_path: str | Path, batch_size: int = 64,
               device: str | torch.device = "cpu") -> float:
    """Mean CLIP score (0..100) of images against their prompts."""
    return float(clip_scores(images, prompts, clip_path, batch_size, device).mean())


def sample_prompts(conditions: object, ids: torch.Tensor | None) -> list[str]:
    """The prompt text of each sample: `ids` index the pipeline's prompt list (Samples.conds)."""
    prompts = getattr(conditions, "prompts", None)
    if not prompts or ids is None:
        raise ValueError("<eval.clip_model> is set but the model is not conditioned on prompts: CLIP score needs a "
                         "text-to-image pipeline with eval.prompts=/path/to/prompts (set eval.clip_model=null "
                         "otherwise)")
    return [prompts[int(i)] for i in ids]
