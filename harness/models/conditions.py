"""Condition sources: what a conditional pipeline is conditioned on, drawn the same for every method.

A source turns (seed, sample index) into a condition id (`draw`), ids into what the denoiser takes
(`embed`) and gives the classifier-free-guidance null condition (`null`). Sampling and calibration
both draw from the model's source (calibration with its own seed, so it sees a different seeded
subset of the labels or prompts than the evaluation), and every method sees the same conditions.

- `ClassLabels`: labels drawn with a seeded generator (not index mod K); null label = num_classes.
- `ClassContext`: the same labels, embedded by the pipeline's learned `ClassEmbedder` into a 1-token
  cross-attention context (LDM cin256: the class reaches the UNet through cross-attention, not
  through its time embedding); the null condition is the embedding of the null class num_classes.
- `PromptEmbeddings`: prompts from a user file (.txt one per line; .csv / .json with a caption
  column, incl. COCO's captions_*.json), encoded ONCE by the pipeline's own CLIP text encoder
  (padding to max_length, last hidden state) and cached as an artifact keyed by the file's content
  and the encoder's weights; the null condition is the empty prompt "" encoded the same way.
- `RandomEmbeddings`: seeded random states for a random-init text denoiser without a text encoder
  (architecture benchmarks and tests only; its null condition is zeros, as no encoder exists).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from harness.artifacts import ArtifactCache, tensors_fingerprint
from harness.identity import prompts_fingerprint

if TYPE_CHECKING:  # transformers (CLIP) loads only with a text pipeline; a resumed run never needs it
    from transformers import CLIPTextModel, CLIPTokenizer

log = logging.getLogger(__name__)
ID_CHUNK = 1000  # ids are drawn per chunk of sample indices, so a shard draws exactly its own slice
ENCODE_BATCH = 64


def _chunked_draw(seed: int, start: int, count: int, draw: Any) -> torch.Tensor:
    """ids for samples [start, start+count): `draw(generator, n)` per fixed chunk, a pure function of (seed, index)."""
    out = []
    for chunk in range(start // ID_CHUNK, (start + count - 1) // ID_CHUNK + 1):
        g = torch.Generator().manual_seed(seed * 1_000_033 + chunk)
        ids = draw(g, ID_CHUNK)
        lo = max(start, chunk * ID_CHUNK) - chunk * ID_CHUNK
        hi = min(start + count, (chunk + 1) * ID_CHUNK) - chunk * ID_CHUNK
        out.append(ids[lo:hi])
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class ConditionSource(ABC):
    """Conditions of a pipeline: ids per sample, the denoiser's input for ids, the CFG null condition."""

    kind: str

    @abstractmethod
    def draw(self, seed: int, start: int, count: int) -> torch.Tensor:
        """LongTensor (count,) of condition ids of samples [start, start+count)."""

    @abstractmethod
    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """The denoiser's condition input for `ids` (labels, or encoder hidden states)."""

    @abstractmethod
    def null(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The classifier-free-guidance null condition, `batch` rows."""

    def to(self, device: torch.device | str) -> ConditionSource:
        return self

    @abstractmethod
    def key(self) -> dict[str, Any]:
        """What the conditions depend on (part of every FP artifact's key)."""


def draw_labels(num_classes: int, seed: int, start: int, count: int) -> torch.Tensor:
    """Class labels of samples [start, start+count): seeded, so every method and shard sees the same ones."""
    return _chunked_draw(seed, start, count, lambda g, n: torch.randint(num_classes, (n,), generator=g))


LABEL_DRAW = "seeded randint per 1000-chunk"


@dataclass
class ClassLabels(ConditionSource):
    num_classes: int
    kind: str = "labels"

    def draw(self, seed: int, start: int, count: int) -> torch.Tensor:
        return draw_labels(self.num_classes, seed, start, count)

    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return ids.to(device)

    def null(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "draw": LABEL_DRAW}


class ClassEmbedder(ModelMixin, ConfigMixin):
    """LDM's class-conditioning stage (CompVis `ClassEmbedder`, e.g. in cin256-v2): a learned table of
    num_classes + 1 rows, the last one the null class of classifier-free guidance. A diffusers model
    class so that its folder (class_embedder/: config.json + safetensors) saves and loads like every
    other part of a pipeline, strictly."""

    @register_to_config
    def __init__(self, num_classes: int = 1000, embedding_dim: int = 512) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embedding_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) labels -> (B, 1, D): one context token per sample, as LDM feeds its cross-attention."""
        return self.embedding(labels)[:, None]


@dataclass(eq=False, repr=False)
class ClassContext(ConditionSource):
    """Labels drawn like `ClassLabels`, handed to the denoiser as their learned embedding (B, 1, D)."""

    embedder: ClassEmbedder
    kind: str = "class_context"

    @property
    def num_classes(self) -> int:
        return int(self.embedder.config.num_classes)

    def draw(self, seed: int, start: int, count: int) -> torch.Tensor:
        return draw_labels(self.num_classes, seed, start, count)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        own = next(self.embedder.parameters()).device
        return self.embedder(ids.to(own)).float().to(device)

    def null(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.embed(torch.full((batch,), self.num_classes, dtype=torch.long), device)

    def to(self, device: torch.device | str) -> ClassContext:
        self.embedder.to(device)
        return self

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_classes": self.num_classes, "draw": LABEL_DRAW,
                "embedder": tensors_fingerprint(self.embedder.state_dict())}


@dataclass
class RandomEmbeddings(ConditionSource):
    cond_shape: tuple[int, ...]
    kind: str = "random_embeddings"

    def draw(self, seed: int, start: int, count: int) -> torch.Tensor:
        return seed * 1_000_003 + torch.arange(start, start + count)  # one seeded random state per (seed, index)

    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        rows = [torch.randn(self.cond_shape, generator=torch.Generator().manual_seed(int(i))) for i in ids]
        return torch.stack(rows).to(device) if rows else torch.zeros((0, *self.cond_shape), device=device)

    def null(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros((batch, *self.cond_shape), device=device)

    def key(self) -> dict[str, Any]:
        return {"kind": self.kind, "cond_shape": list(self.cond_shape)}


def read_prompts(path: str | Path, column: str = "caption") -> list[str]:
    """Prompts of a file: .txt (one per line), .csv (a column), .json (COCO captions, a list of records or strings)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"eval.prompts={str(path)!r} is not a file; expected a .txt (one prompt per line), "
                                f".csv or .json (with a {column!r} column, e.g. COCO captions_val2014.json)")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no column {column!r} (eval.prompt_column); columns: {reader.fieldnames}")
            prompts = [str(row[column]) for row in reader]
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        records = data.get("annotations") if isinstance(data, Mapping) else data
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a list of records or COCO's {{'annotations': [...]}}")
        prompts = []
        for r in records:
            if isinstance(r, str):
                prompts.append(r)
            elif isinstance(r, Mapping) and column in r:
                prompts.append(str(r[column]))
            else:
                raise ValueError(f"{path}: a record lacks the column {column!r} (eval.prompt_column): {str(r)[:80]}")
    else:
        raise ValueError(f"eval.prompts={str(path)!r}: unsupported suffix {suffix!r}; accepted: .txt, .csv, .json")
    if not prompts:
        raise ValueError(f"eval.prompts={str(path)!r} holds no prompts")
    return prompts


@dataclass(eq=False, repr=False)
class PromptEmbeddings(ConditionSource):
    """Prompts encoded by the pipeline's CLIP text encoder; unusable until `bind` gave it a prompt file."""

    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    kind: str = "prompts"
    prompts: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None  # (P, L, D), CPU
    null_embedding: torch.Tensor | None = None  # (1, L, D): the empty prompt
    file_key: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def encoder_fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.tokenizer.get_vocab().items()))
        weights = tensors_fingerprint(self.text_encoder.state_dict())
        return f"{weights}:{hashlib.sha256(vocab.encode()).hexdigest()[:16]}"

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), max_length, hidden) last hidden states, as SD's pipelines condition the UNet."""
        device = next(self.text_encoder.parameters()).device
        out = []
        for i in range(0, len(prompts), ENCODE_BATCH):
            tokens = self.tokenizer(prompts[i : i + ENCODE_BATCH], padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")
            out.append(self.text_encoder(tokens.input_ids.to(device)).last_hidden_state.float().cpu())
        return torch.cat(out)

    def bind(self, path: str | Path, column: str, cache: ArtifactCache) -> None:
        """Read the prompt file and encode it (and "") once, through the artifact cache."""
        path = Path(path).expanduser()
        self.prompts = read_prompts(path, column)
        self.file_key = {"prompts_sha256": prompts_fingerprint(path), "column": column, "n_prompts": len(self.prompts)}
        deps = {**self.file_key, "text_encoder": self.encoder_fingerprint(), "max_length": self.max_length}

        def build() -> dict[str, torch.Tensor]:
            log.info("encoding %d prompts of %s with the pipeline's text encoder", len(self.prompts), path)
            return {"embeddings": self.encode(self.prompts), "null": self.encode([""])}

        tensors = cache.get_or_build("prompt_embeddings", deps, build)
        self.embeddings, self.null_embedding = tensors["embeddings"], tensors["null"]
        self.file_key["text_encoder"] = deps["text_encoder"]

    def _bound(self) -> torch.Tensor:
        if self.embeddings is None:
            raise RuntimeError("this text-conditional pipeline has no prompts yet: set eval.prompts=/path/to/prompts "
                               "(.txt one per line, or .csv/.json with eval.prompt_column)")
        return self.embeddings

    def draw(self, seed: int, start: int, count: int) -> torch.Tensor:
        """Prompt indices: a seeded permutation of the file, cycled (every prompt before any repeats)."""
        p = len(self._bound())
        order = torch.randperm(p, generator=torch.Generator().manual_seed(seed * 1_000_033 + 17))
        return order[torch.arange(start, start + count) % p]

    def embed(self, ids: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._bound()[ids.cpu()].to(device)

    def null(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        self._bound()
        return self.null_embedding.expand(batch, -1, -1).to(device)

    def to(self, device: torch.device | str) -> PromptEmbeddings:
        self.text_encoder.to(device)
        return self

    def key(self) -> dict[str, Any]:
        self._bound()
        return {"kind": self.kind, **self.file_key}


def bind_prompts(source: ConditionSource | None, prompts: str | None, column: str, cache: ArtifactCache) -> None:
    """Give a text pipeline its prompt file (encoded once, cached); models without prompts ignore it."""
    if isinstance(source, PromptEmbeddings):
        if not prompts:
            raise ValueError("<eval.prompts=None>: this text-conditional pipeline needs a prompt file, e.g. "
                             "eval.prompts=/data/coco/captions_val2014.json eval.prompt_column=caption")
        source.bind(prompts, column, cache)
    elif prompts:
        log.warning("eval.prompts=%s ignored: the model is not conditioned on prompts", prompts)
