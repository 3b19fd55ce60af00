"""The Temporal Information Block: discovery and evaluation of temporal features.

The TIB is every module whose output depends only on the timestep (and a finite class label). Its
outputs consumed by the rest of the network are the *temporal features*:

- diffusers UNets: time_proj -> time_embedding (+ class_embedding) [-> time_embed_act] -> emb;
  feature i = `<resnet i>.time_emb_proj(SiLU(emb))`.
- DiT (DiTTransformer2DModel): per block, `norm1.emb` (timestep + label embedder) and the adaLN-Zero
  modulation `norm1.linear(SiLU(.))`; the final `proj_out_1(SiLU(.))` modulation.

A condition that is not finite (SDXL-style `add_embedding`, projected class embeddings) is added to
emb before the projections, so the projections are no longer functions of (t, label). It is split
off: the TIB shrinks to the time (and finite label) embedding, whose output is then the single
temporal feature, and nothing is cacheable.

`temporal_features` evaluates the TIB alone (no image input), which makes TIAR, the cache and the
selection cheap: their inputs are just every (timestep, label) pair of the sampler.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from methods.engine.context import timestep_scope
from methods.engine.modules import QuantLayer
from methods.temporal.labels import label_scope

SPLIT_FEATURE = "time_embedding"


@dataclass
class TIB:
    """Where the Temporal Information Block of a network is.

    layers: weight layers (Conv2d / Linear / QuantLayer names) inside the TIB.
    features: module names whose outputs are the temporal features (the metrics hook these names).
    embedders: modules computing the shared embedding; skipped when every feature is cached.
    label_conditional: the TIB takes a finite class label (the cache is keyed by it too).
    non_finite: condition modules split off the TIB (not cacheable).
    """

    family: Literal["unet", "dit"]
    layers: list[str]
    features: list[str]
    embedders: list[str]
    label_conditional: bool
    non_finite: list[str] = field(default_factory=list)

    @property
    def cacheable(self) -> bool:
        return not self.non_finite

    @property
    def split(self) -> bool:
        return bool(self.non_finite)


def _weight_layers(net: nn.Module, prefix: str) -> list[str]:
    """Names of quantizable weight layers at or under `prefix` (a QuantLayer counts once)."""
    out: list[str] = []
    for name, m in net.named_modules():
        if not (name == prefix or name.startswith(prefix + ".")):
            continue
        if isinstance(m, QuantLayer):
            out.append(name)
        elif isinstance(m, nn.Conv2d | nn.Linear):
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            if not isinstance(parent, QuantLayer):
                out.append(name)
    return out


def _is_linear(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, QuantLayer) and isinstance(m.layer, nn.Linear))


def _finite_class_embedding(net: nn.Module) -> bool:
    """Integer labels through a lookup table (or the sinusoid) are a finite set; projections are not."""
    kind = getattr(net.config, "class_embed_type", None)
    return isinstance(net.class_embedding, nn.Embedding) or kind == "timestep"


def _find_unet_tib(net: nn.Module) -> TIB:
    if getattr(net.time_embedding, "cond_proj", None) is not None:
        raise ValueError(
            "time_embedding.cond_proj (timestep_cond, e.g. an LCM guidance embedding) makes the time "
            "embedding depend on a continuous condition: this UNet has no finite Temporal Information "
            "Block; use a method without TIB maintenance (qdiff, ptq4dm, rtn)"
        )
    non_finite: list[str] = []
    label_conditional = False
    embedders = ["time_embedding"]
    if getattr(net, "class_embedding", None) is not None:
        if _finite_class_embedding(net):
            label_conditional = True
            embedders.append("class_embedding")
        else:
            non_finite.append("class_embedding")
    if getattr(net, "add_embedding", None) is not None:
        non_finite.append("add_embedding")
    layers = [n for e in embedders for n in _weight_layers(net, e)]
    if non_finite:
        return TIB("unet", layers, [SPLIT_FEATURE], embedders, label_conditional, non_finite)
    features = [
        f"{name}.time_emb_proj"
        for name, m in net.named_modules()
        if _is_linear(getattr(m, "time_emb_proj", None)) and hasattr(m, "nonlinearity")
    ]
    return TIB("unet", layers + features, features, embedders, label_conditional)


def _find_dit_tib(net: nn.Module) -> TIB:
    blocks = net.transformer_blocks
    missing = [i for i, b in enumerate(blocks) if getattr(getattr(b, "norm1", None), "emb", None) is None]
    if missing:
        raise ValueError(
            f"transformer_blocks {missing} have no adaLN-Zero timestep/label embedder (norm1.emb): "
            "only DiT with norm_type='ada_norm_zero' has a recognisable Temporal Information Block"
        )
    embedders = [f"transformer_blocks.{i}.norm1.emb" for i in range(len(blocks))]
    features = [f"transformer_blocks.{i}.norm1.linear" for i in range(len(blocks))]
    if _is_linear(getattr(net, "proj_out_1", None)):
        features.append("proj_out_1")
    layers = [n for e in embedders for n in _weight_layers(net, e)] + features
    return TIB("dit", layers, features, embedders, label_conditional=True)


def find_tib(net: nn.Module) -> TIB:
    """Locate the TIB of a diffusers UNet2DModel / UNet2DConditionModel / DiTTransformer2DModel."""
    if hasattr(net, "time_proj") and hasattr(net, "time_embedding"):
        return _find_unet_tib(net)
    if hasattr(net, "transformer_blocks") and hasattr(net, "proj_out_1"):
        return _find_dit_tib(net)
    raise ValueError(
        f"no Temporal Information Block found in {type(net).__name__}: searched for a UNet time "
        "embedding (time_proj + time_embedding, optional class_embedding, ResnetBlock2D.time_emb_proj) "
        "and a DiT adaLN-Zero embedding (transformer_blocks.*.norm1.emb / norm1.linear + proj_out_1)"
    )


def _dtype(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def _unet_embedding(net: nn.Module, tib: TIB, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """emb as the UNet forward computes it, from (t, label) only (split-off conditions left out)."""
    dtype = _dtype(net)
    emb = net.time_embedding(net.time_proj(t).to(dtype))
    if tib.label_conditional:
        if labels is None:
            raise ValueError("this TIB is class-conditional: temporal features need class labels")
        lab = labels
        if getattr(net.config, "class_embed_type", None) == "timestep":
            lab = net.time_proj(labels).to(dtype)
        class_emb = net.class_embedding(lab).to(dtype)
        emb = torch.cat([emb, class_emb], -1) if net.config.get("class_embeddings_concat") else emb + class_emb
    act = getattr(net, "time_embed_act", None)
    if act is not None and not tib.split:
        emb = act(emb)
    return emb


def _unet_features(net: nn.Module, tib: TIB, t: torch.Tensor, labels: torch.Tensor | None) -> dict:
    emb = _unet_embedding(net, tib, t, labels)
    if tib.split:
        return {SPLIT_FEATURE: emb}
    out = {}
    for name in tib.features:
        block = net.get_submodule(name.rpartition(".")[0])
        x = emb if getattr(block, "skip_time_act", False) else block.nonlinearity(emb)
        out[name] = block.time_emb_proj(x)
    return out


def _dit_features(net: nn.Module, tib: TIB, t: torch.Tensor, labels: torch.Tensor | None) -> dict:
    if labels is None:
        raise ValueError("DiT's TIB embeds a class label with the timestep: temporal features need labels")
    dtype = _dtype(net)
    out = {}
    first = None
    for i, block in enumerate(net.transformer_blocks):
        cond = block.norm1.emb(t, labels, hidden_dtype=dtype)
        first = cond if i == 0 else first
        out[f"transformer_blocks.{i}.norm1.linear"] = block.norm1.linear(block.norm1.silu(cond))
    if "proj_out_1" in tib.features:
        out["proj_out_1"] = net.proj_out_1(F.silu(first))
    return out


def temporal_features(net: nn.Module, tib: TIB, t: torch.Tensor, labels: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """Evaluate the TIB alone: {feature name: (N, D)} for timesteps `t` (N,) and labels (N,) or None.

    The timestep and labels are published (methods/engine/context.py, labels.py) so per-timestep
    quantizers and caches inside the TIB see them, exactly as in a full denoiser call.
    """
    t = t.long().flatten()
    with timestep_scope(t), label_scope(labels):
        if tib.family == "unet":
            return _unet_features(net, tib, t, labels)
        return _dit_features(net, tib, t, labels)


def label_axis(tib: TIB, labels: list[int]) -> list[int | None]:
    """The labels a temporal feature varies over: every label (incl. the CFG null) or just None."""
    if not tib.label_conditional:
        return [None]
    if not labels:
        raise ValueError("the TIB is class-conditional but calibration data lists no labels")
    return list(labels)


def iter_schedule(net: nn.Module, tib: TIB, schedule: list[int], labels: list[int]
                  ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(timestep, {name: (n_labels, D)}) for every sampler timestep, every label in one batch.

    One timestep per call because per-timestep (FSC) quantizers take one timestep per batch; one
    timestep at a time because the full grid of a many-class model does not fit in memory.
    """
    axis = label_axis(tib, labels)
    device = next(net.parameters()).device
    lab = None if axis == [None] else torch.tensor(axis, device=device)
    for ts in schedule:
        t = torch.full((len(axis),), int(ts), dtype=torch.long, device=device)
        yield int(ts), temporal_features(net, tib, t, lab)
