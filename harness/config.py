"""The typed boundary: the composed Hydra config is validated here once, before anything loads.

Every error names the config key and what is accepted, e.g.
`<bits.weight_bits=3.5> must be an integer in 2..8`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SAMPLERS = ("ddim", "ddpm", "dpm_solver", "plms")
EXTRACTORS = ("auto", "lenet", "inception", "none")
REFERENCES = ("auto", "dataset", "fp")
RESIZE_MODES = ("legacy_tensorflow", "clean", "legacy_pytorch")  # clean-fid's modes (harness/metrics/inception.py)
RECIPES = ("quick", "paper")


def _name(group: str, key: str) -> str:
    return f"{group}.{key}" if group else key


def _int(cfg: Mapping, group: str, key: str, lo: int, hi: int | None = None) -> int:
    v = cfg.get(key)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        accepted = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"<{_name(group, key)}={v}> must be {accepted}")
    return v


def _choice(cfg: Mapping, group: str, key: str, accepted: tuple[str, ...]) -> str:
    v = cfg.get(key)
    if v not in accepted:
        raise ValueError(f"<{_name(group, key)}={v}> must be one of {', '.join(accepted)}")
    return v


def _float(cfg: Mapping, group: str, key: str, lo: float, hi: float) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise ValueError(f"<{_name(group, key)}={v}> must be a number in [{lo}, {hi}]")
    return float(v)


@dataclass(frozen=True)
class BitsConfig:
    weight_bits: int
    act_bits: int  # 32 = not quantized

    @classmethod
    def parse(cls, cfg: Mapping) -> BitsConfig:
        w = _int(cfg, "bits", "weight_bits", 2, 8)
        a = cfg.get("act_bits")
        if a != 32 and not (isinstance(a, int) and not isinstance(a, bool) and 2 <= a <= 8):
            raise ValueError(f"<bits.act_bits={a}> must be an integer in 2..8, or 32 for unquantized activations")
        return cls(w, a)

    @property
    def tag(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


@dataclass(frozen=True)
class SamplerConfig:
    name: str
    steps: int
    eta: float

    @classmethod
    def parse(cls, cfg: Mapping) -> SamplerConfig:
        return cls(
            _choice(cfg, "sampler", "name", SAMPLERS),
            _int(cfg, "sampler", "steps", 1, 1000),
            _float(cfg, "sampler", "eta", 0.0, 1.0),
        )


def _reference(cfg: Mapping) -> str:
    """auto / dataset / fp, or the user's reference data (a folder or an npz), checked here so a bad
    path fails before anything loads."""
    v = cfg.get("reference")
    if v in REFERENCES:
        return v
    if v is None or v == "???":  # the paper presets leave it to the user (null: ??? cannot override in a merge)
        raise ValueError(f"<eval.reference={v}> must be given: the paper presets compare against the user's "
                         "reference data, e.g. eval.reference=/data/cifar10_train (see the preset's comments)")
    if not isinstance(v, str) or not v:
        raise ValueError(f"<eval.reference={v}> must be one of {', '.join(REFERENCES)} or a path")
    from harness.metrics.reference_data import reference_format

    reference_format(v)
    return v


def _optional_str(cfg: Mapping, group: str, key: str) -> str | None:
    v = cfg.get(key)
    if v is not None and not (isinstance(v, str) and v):
        raise ValueError(f"<{_name(group, key)}={v}> must be a non-empty string or null")
    return v


@dataclass(frozen=True)
class EvalConfig:
    name: str
    n_samples: int
    batch_size: int
    seed: int
    extractor: str
    reference: str
    inception_weights: str | None
    inception_random: bool
    resize: str
    clip_model: str | None
    n_trajectory: int
    temporal: bool
    latency_batch_sizes: tuple[int, ...]
    latency_warmup: int
    latency_iters: int
    grid: int
    prompts: str | None = None  # prompt file of a text-to-image pipeline (.txt, or .csv/.json + prompt_column)
    prompt_column: str = "caption"

    @classmethod
    def parse(cls, cfg: Mapping) -> EvalConfig:
        lat = cfg.get("latency") or {}
        sizes = lat.get("batch_sizes", [])
        if not isinstance(sizes, list | tuple) or not all(isinstance(b, int) and b >= 1 for b in sizes):
            raise ValueError(f"<eval.latency.batch_sizes={sizes}> must be a list of positive integers")
        n = _int(cfg, "eval", "n_samples", 2)
        return cls(
            name=str(cfg.get("name", "custom")),
            n_samples=n,
            batch_size=_int(cfg, "eval", "batch_size", 1),
            seed=_int(cfg, "eval", "seed", 0),
            extractor=_choice(cfg, "eval", "extractor", EXTRACTORS),
            reference=_reference(cfg),
            inception_weights=cfg.get("inception_weights"),
            inception_random=bool(cfg.get("inception_random", False)),
            resize=_choice(cfg, "eval", "resize", RESIZE_MODES) if "resize" in cfg else "legacy_tensorflow",
            clip_model=cfg.get("clip_model"),
            n_trajectory=min(_int(cfg, "eval", "n_trajectory", 0), n),
            temporal=bool(cfg.get("temporal", True)),
            latency_batch_sizes=tuple(sizes),
            latency_warmup=_int(lat, "eval.latency", "warmup", 0),
            latency_iters=_int(lat, "eval.latency", "iters", 1),
            grid=_int(cfg, "eval", "grid", 0),
            prompts=_optional_str(cfg, "eval", "prompts"),
            prompt_column=_optional_str(cfg, "eval", "prompt_column") or "caption",
        )


@dataclass(frozen=True)
class CalibrationConfig:
    """FP trajectories captured for calibration (every step of each), shared by all methods."""

    n_samples: int
    batch_size: int
    seed: int

    @classmethod
    def parse(cls, cfg: Mapping) -> CalibrationConfig:
        return cls(
            _int(cfg, "calibration", "n_samples", 1),
            _int(cfg, "calibration", "batch_size", 1),
            _int(cfg, "calibration", "seed", 0),
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, validated. Model/method/backend groups stay dicts: their own
    registries validate them (the zoo, methods/, harness/backends/)."""

    model: dict[str, Any]
    method: dict[str, Any]
    backend: dict[str, Any]
    logger: dict[str, Any]
    bits: BitsConfig
    sampler: SamplerConfig
    eval: EvalConfig
    calibration: CalibrationConfig
    recipe: str
    seed: int
    device: str
    force: bool
    paths: dict[str, str]

    @classmethod
    def parse(cls, cfg: Mapping) -> RunConfig:
        for group in ("model", "method", "backend", "bits", "sampler", "eval", "calibration", "paths"):
            if not isinstance(cfg.get(group), Mapping):
                raise ValueError(f"config group <{group}> is missing; check conf/config.yaml defaults")
        device = str(cfg.get("device", "auto"))
        if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"<device={device}> must be auto, cpu, cuda or cuda:N")
        return cls(
            model=dict(cfg["model"]),
            method=dict(cfg["method"]),
            backend=dict(cfg["backend"]),
            logger=dict(cfg.get("logger") or {"name": "none"}),
            bits=BitsConfig.parse(cfg["bits"]),
            sampler=SamplerConfig.parse(cfg["sampler"]),
            eval=EvalConfig.parse(cfg["eval"]),
            calibration=CalibrationConfig.parse(cfg["calibration"]),
            recipe=_choice(cfg, "", "recipe", RECIPES) if "recipe" in cfg else "quick",
            seed=_int(cfg, "", "seed", 0),
            device=device,
            force=bool(cfg.get("force", False)),
            paths={k: str(v) for k, v in cfg["paths"].items()},
        )

    @property
    def is_fp(self) -> bool:
        return self.method.get("name") == "fp"

    @property
    def bits_tag(self) -> str:
        """fp runs are tagged w32a32 whatever `bits` says, so tables show one FP row."""
        return "w32a32" if self.is_fp else self.bits.tag
