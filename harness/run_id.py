"""Run identity: a stable hash of what a run computes, so a sweep can skip runs already in the store.

Two configs that differ only in how a run is shown or logged (W&B settings, output paths, Hydra's
own bookkeeping, `force`) compute the same numbers and must get the same id; any other change
(bits, method knobs, seeds, recipe) must give a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import Container, DictConfig, OmegaConf

# The one place that says which config keys do not change what a run computes. Dotted paths
# reach into groups (e.g. "eval.progress"); top-level names drop the whole group.
PRESENTATION_KEYS: tuple[str, ...] = ("logger", "paths", "hydra", "force", "print_config")

RUN_ID_LENGTH = 16


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return json.loads(json.dumps(cfg, default=_jsonable))


def _jsonable(obj: object) -> Any:
    """json.dumps fallback: nested OmegaConf nodes and mappings become plain containers."""
    if isinstance(obj, Container):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(
        f"run_id: config value {obj!r} of type {type(obj).__name__} is not JSON-serialisable; "
        "accepted: dict, list, tuple, str, int, float, bool, None"
    )


def _drop(cfg: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = cfg
    for key in parents:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def identity_config(cfg: Mapping[str, Any], presentation_keys: tuple[str, ...] = PRESENTATION_KEYS) -> dict:
    """The part of the resolved config that determines the results (a fresh plain dict)."""
    plain = _plain(cfg)
    for key in presentation_keys:
        _drop(plain, key)
    return plain


def canonical_json(obj: Any) -> str:
    """Key-order-independent JSON text: the byte string the hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable)


def run_id(cfg: Mapping[str, Any], presentation_keys: tuple[str, ...] = PRESENTATION_KEYS) -> str:
    """sha256 of the canonical JSON of the identity config, first 16 hex characters."""
    text = canonical_json(identity_config(cfg, presentation_keys))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:RUN_ID_LENGTH]
