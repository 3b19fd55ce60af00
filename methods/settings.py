"""Typed schemas for method settings, checked before anything is loaded.

Each method class declares `Settings`, a dataclass whose fields are the keys its yaml may hold (the
top level and every recipe): the annotation is the accepted type, `field(metadata=...)` may add
`choices` or a `min` / `max`, and a field without a default is required once the recipe is merged.
`check_settings` names the offending key and what it accepts, e.g. `<method.lr=abc> must be a number`,
and rejects unknown keys with a did-you-mean, so a typo fails at once and not after calibration.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from methods.engine.quantizer import RangeInit

RECIPES_KEY = "recipes"
RANGE_INITS: tuple[str, ...] = typing.get_args(RangeInit)
_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def choice(default: Any, choices: tuple[Any, ...]) -> Any:
    """A field that accepts only `choices`."""
    return field(default=default, metadata={"choices": tuple(choices)})


def bounded(default: Any = dataclasses.MISSING, lo: float | None = None, hi: float | None = None) -> Any:
    """A number field within [lo, hi] (either bound optional); no default = required."""
    return field(default=default, metadata={"min": lo, "max": hi})


@dataclass(frozen=True, kw_only=True)
class MethodSettings:
    """Keys every method config has: its registry name, the layers kept FP, the run's seed."""

    name: str
    keep_fp: list[str] = field(default_factory=list)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class GridSettings(MethodSettings):
    """The quantization grid every quantizing method sets: range inits, symmetry, attention quantizers."""

    weight_init: str = choice("minmax", RANGE_INITS)
    act_init: str = choice("minmax", RANGE_INITS)
    weight_symmetric: bool = False
    act_symmetric: bool = False
    quant_attention: bool = True


@dataclass(frozen=True, kw_only=True)
class ReconSettings(GridSettings):
    """Keys read by the engine's block reconstruction (methods/engine/reconstruction.ReconConfig)."""

    weight_init: str = choice("mse", RANGE_INITS)
    act_init: str = choice("mse", RANGE_INITS)
    lr: float = bounded(1e-3, lo=0.0)
    act_lr: float = bounded(4e-5, lo=0.0)
    weight_lambda: float = bounded(0.01, lo=0.0)
    warmup: float = bounded(0.2, lo=0.0, hi=1.0)
    beta: tuple[float, float] = (20.0, 2.0)
    qdrop_prob: float = bounded(0.0, lo=0.0, hi=1.0)
    iters: int = bounded(lo=0)
    batch_size: int = bounded(lo=1)
    capture_batch_size: int = bounded(64, lo=1)
    n_samples: int | None = None
    eval_rows: int = bounded(256, lo=1)


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, {}) for a in args)
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin is tuple:
        return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
    base = {int: "an integer", float: "a number (float)", bool: "true or false", str: "a string"}.get(tp, str(tp))
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"{base} in [{lo}, {hi}]"
    if lo is not None:
        return f"{base} >= {lo}"
    return base


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, list | tuple) and len(value) == len(args)
                and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _check_value(key: str, value: Any, tp: Any, meta: Mapping[str, Any]) -> None:
    ok = _matches(value, tp)
    if ok and meta.get("choices"):
        ok = value in meta["choices"]
    if ok and isinstance(value, int | float) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ValueError(f"<{key}={value}> must be {_describe(tp, meta)}")


def _check_keys(schema: type, values: Mapping[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    specs = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in specs:
            close = difflib.get_close_matches(str(key), list(specs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"<{prefix}.{key}> is not a setting of this method{hint} "
                             f"(accepted: {', '.join(sorted(specs))})")
        _check_value(f"{prefix}.{key}", value, hints[key], specs[key].metadata)


def check_settings(method_cls: type, cfg: Mapping[str, Any], recipe: str, group: str = "method") -> None:
    """Check `cfg` (the method's config group) against `method_cls.Settings`: every key's type and
    range, unknown keys, every recipe's keys, and the required keys once `recipe` is merged."""
    schema = getattr(method_cls, "Settings", None)
    if schema is None:
        raise TypeError(f"method {method_cls.__name__} declares no Settings schema (methods/settings.py)")
    top = {k: v for k, v in cfg.items() if k != RECIPES_KEY}
    _check_keys(schema, top, group)
    recipes = cfg.get(RECIPES_KEY) or {}
    if not isinstance(recipes, Mapping):
        raise ValueError(f"<{group}.{RECIPES_KEY}> must map recipe names to settings")
    for name, overrides in recipes.items():
        if not isinstance(overrides, Mapping):
            raise ValueError(f"<{group}.{RECIPES_KEY}.{name}> must be a mapping of settings")
        _check_keys(schema, overrides, f"{group}.{RECIPES_KEY}.{name}")
    merged = {**top, **(recipes.get(recipe) or {})}
    required = [f.name for f in dataclasses.fields(schema)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in merged]
    if missing:
        where = f" (recipe {recipe})" if recipes else ""
        raise ValueError(f"method settings {', '.join(f'<{group}.{k}>' for k in missing)} are required{where}")
