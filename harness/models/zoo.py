"""The model zoo: turn a resolved `model` config group (conf/model/<name>.yaml) into a DiffusionModel.

A model is a pipeline: the denoiser, its scheduler, and the parts the config asks for, loaded from the
same folder as diffusers lays it out: `model.decoder: vae|vqvae` (AutoencoderKL in `vae/`, VQModel in
`vqvae/`, decoding to `model.image_shape`), `model.text_encoder: clip` (CLIPTextModel in
`text_encoder/`, CLIPTokenizer in `tokenizer/`) and `model.class_embedder: ldm` (LDM's learned class
embedding in `class_embedder/`, whose row for a label is the 1-token cross-attention context of a
UNet2DConditionModel: ImageNet LDM-4 cin256-v2, converted by `python -m harness.models.convert_ldm`).
A part the config needs but the folder lacks fails the load, naming the subfolder. Loading is strict:
a checkpoint with missing or unexpected tensors, or a diffusers config.json without `_class_name`, is
refused (diffusers and transformers only warn and fill the gaps with random values).

Where the weights come from, first match wins:
1. `model.path`: a local diffusers folder (flat `config.json` + weights, or a pipeline folder with
   `unet/` or `transformer/` and `scheduler/`). Overrides everything else.
2. `model.weights`: a folder shipped inside the package (harness/models/weights/<weights>).
3. `model.hub_id`: a Hugging Face hub id (needs network or a filled hub cache).
`model.init: random` instead builds the net from `model.arch` with `model.seed` (tests, CPU
benchmarks of real architectures without their checkpoints).

With weights, the architecture is the checkpoint's own config.json: `model.arch` only builds random
nets. Where the two differ the folder wins, and `DiffusionModel.extra["arch_differs"]` lists the keys
(a warning too), so a record never hides that the yaml described another net. A decoder whose
config.json declares no `scaling_factor` (diffusers would substitute the SD VAE's 0.18215) needs
`model.decoder_scaling_factor`; one that declares a different value than that key is refused.

The scheduler config is the one stored with the weights when there is one, else `model.scheduler`;
`DiffusionModel.extra["scheduler_source"]` records which, so a record never hides the choice.
`MODELS` maps each family to its diffusers class; adding a family = one `MODELS.register` line here
plus its branch in harness/models/base.py:denoise.
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.modeling_utils import ModelMixin

from harness.models.base import DiffusionModel
from harness.models.conditions import ClassContext, ClassEmbedder, PromptEmbeddings
from harness.models.decoder import DECODER_CLASSES, Decoder
from harness.models.layout import (
    HOW_TO_PROVIDE,
    local_layout,
    plain,
    weights_root,
)
from harness.registry import Registry

log = logging.getLogger(__name__)
MODELS: Registry[type[ModelMixin]] = Registry("model family")
MODELS.register("unet")(UNet2DModel)
MODELS.register("unet_text")(UNet2DConditionModel)
MODELS.register("dit")(DiTTransformer2DModel)

BUILTIN_WEIGHTS = ("ddpm_mnist", "ddpm_mnist_cond", "ldm_mnist", "dit_mnist")
# How to train each shipped folder (named in the error when the folder is missing).
_LATENT = "python -m harness.models.train_latent --stage"
TRAIN_COMMAND = {"ddpm_mnist": "python -m harness.models.train --name ddpm_mnist",
                 "ddpm_mnist_cond": "python -m harness.models.train --name ddpm_mnist_cond",
                 "ldm_mnist": f"{_LATENT} vae && {_LATENT} ldm", "dit_mnist": f"{_LATENT} vae && {_LATENT} dit"}
DATASETS = ("mnist",)
INITS = ("pretrained", "random")
# facebook/DiT-XL-2-256 predates DiTTransformer2DModel: its config.json names the generic class.
LEGACY_CLASS_NAMES = {"dit": ("Transformer2DModel",)}
DECODERS = tuple(DECODER_CLASSES)
TEXT_ENCODERS = ("clip",)
CLASS_EMBEDDERS = ("ldm",)  # ldm: CompVis's ClassEmbedder (nn.Embedding(num_classes + 1, D)) in class_embedder/
KEYS = ("name", "family", "sample_shape", "num_classes", "cond_shape", "guidance_scale", "dataset",
        "init", "path", "weights", "hub_id", "subfolder", "local_files_only", "arch", "seed", "scheduler",
        "decoder", "image_shape", "text_encoder", "class_embedder", "decoder_scaling_factor")


def _fail(key: str, value: Any, accepted: str) -> NoReturn:
    raise ValueError(f"<model.{key}={value!r}> is invalid; accepted: {accepted}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_keys(cfg: Mapping) -> None:
    for key in cfg:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            hint = f" Did you mean model.{close[0]}?" if close else ""
            raise ValueError(f"model.{key} is not a model config key; accepted: {', '.join(KEYS)}.{hint}")
    for key in ("name", "family", "sample_shape"):
        if cfg.get(key) is None:
            raise ValueError(f"model.{key} is required (every conf/model/*.yaml sets it)")


def _check_shapes(cfg: Mapping) -> None:
    shape = cfg["sample_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape)):
        _fail("sample_shape", shape, "three positive integers [channels, height, width]")
    k = cfg.get("num_classes")
    if k is not None and not (_is_int(k) and k > 0):
        _fail("num_classes", k, "a positive integer (the null label is num_classes) or null")
    cond = cfg.get("cond_shape")
    if cond is not None and not (isinstance(cond, (list, tuple)) and cond and all(_is_int(s) and s > 0 for s in cond)):
        _fail("cond_shape", cond, "a list of positive integers, e.g. [77, 768], or null")
    family = cfg["family"]
    if family == "unet_text" and cond is None:
        _fail("cond_shape", cond, "a shape for family unet_text (its cross-attention context)")
    if family == "unet_text" and k is not None and not cfg.get("class_embedder"):
        _fail("num_classes", k, "null for family unet_text, unless model.class_embedder embeds the labels "
              "as its cross-attention context")
    if family == "dit" and k is None:
        _fail("num_classes", k, "a positive integer for family dit (DiT is class-conditional)")
    if family in ("unet", "dit") and cond is not None:
        _fail("cond_shape", cond, f"null for family {family} (it takes labels, not embeddings)")
    g = cfg.get("guidance_scale", 1.0)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
        _fail("guidance_scale", g, "a number >= 0 (1.0 = no classifier-free guidance)")
    if k is None and cond is None and g != 1.0:
        _fail("guidance_scale", g, "1.0 for an unconditional model")


def _check_parts(cfg: Mapping) -> None:
    decoder, image = cfg.get("decoder"), cfg.get("image_shape")
    if decoder is not None and decoder not in DECODERS:
        _fail("decoder", decoder, f"null (pixel-space model), {' or '.join(DECODERS)}")
    if image is not None and not (isinstance(image, (list, tuple)) and len(image) == 3
                                  and all(_is_int(v) and v > 0 for v in image)):
        _fail("image_shape", image, "three positive integers [channels, height, width] (the decoded images) or null")
    if decoder is not None and image is None:
        _fail("image_shape", image, f"the decoded image shape [C, H, W] when model.decoder={decoder}")
    if decoder is None and image is not None and list(image) != list(cfg["sample_shape"]):
        _fail("image_shape", image, "null or model.sample_shape when model.decoder is null")
    enc = cfg.get("text_encoder")
    if enc is not None and enc not in TEXT_ENCODERS:
        _fail("text_encoder", enc, f"null or {', '.join(TEXT_ENCODERS)}")
    if enc is not None and cfg["family"] != "unet_text":
        _fail("text_encoder", enc, f"null for family {cfg['family']} (only unet_text takes prompts)")
    emb = cfg.get("class_embedder")
    if (cfg["family"] == "unet_text" and enc is None and emb is None and cfg.get("init", "pretrained") != "random"):
        _fail("text_encoder", enc, "clip for a pretrained unet_text model (its prompts are encoded by the "
              "folder's text_encoder/ + tokenizer/; zero-filled text states mean nothing), or set "
              "model.class_embedder for a class-conditional one")
    if emb is not None:
        _check_class_embedder(cfg, emb)
    scale = cfg.get("decoder_scaling_factor")
    if scale is not None and (decoder is None or isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not scale > 0):
        _fail("decoder_scaling_factor", scale, "null, or a number > 0 with model.decoder set (used only when the "
              "decoder's config.json declares no scaling_factor)")


def _check_class_embedder(cfg: Mapping, emb: Any) -> None:
    if emb not in CLASS_EMBEDDERS:
        _fail("class_embedder", emb, f"null or {', '.join(CLASS_EMBEDDERS)}")
    if cfg["family"] != "unet_text" or cfg.get("text_encoder") is not None:
        _fail("class_embedder", emb, "null unless family is unet_text without a text_encoder (the labels' "
              "embedding is the cross-attention context)")
    if cfg.get("num_classes") is None:
        _fail("num_classes", None, "a positive integer with model.class_embedder (the null label is num_classes)")
    cond = cfg.get("cond_shape")
    if not (isinstance(cond, (list, tuple)) and len(cond) == 2 and cond[0] == 1):
        _fail("cond_shape", cond, "[1, D] with model.class_embedder (one context token of width D per sample)")


def _check_arch(cfg: Mapping, cls: type[ModelMixin]) -> None:
    arch = cfg.get("arch")
    if arch is None:
        return
    if not isinstance(arch, Mapping):
        _fail("arch", arch, f"a mapping of {cls.__name__} constructor arguments")
    params = inspect.signature(cls.__init__).parameters
    for key in arch:
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ValueError(f"model.arch.{key} is not a {cls.__name__} argument.{hint}")
    c, h, _ = cfg["sample_shape"]
    if arch.get("in_channels", params["in_channels"].default) != c:
        _fail("arch", dict(arch), f"in_channels equal to model.sample_shape[0]={c}")
    if "sample_size" in arch and arch["sample_size"] != h:
        _fail("arch", dict(arch), f"sample_size equal to model.sample_shape[1]={h}")


def _check_source(cfg: Mapping) -> None:
    init = cfg.get("init", "pretrained")
    if init not in INITS:
        _fail("init", init, " or ".join(INITS))
    for key in ("path", "hub_id", "subfolder"):
        if cfg.get(key) is not None and not (isinstance(cfg[key], str) and cfg[key]):
            _fail(key, cfg[key], "a non-empty string or null")
    weights = cfg.get("weights")
    if weights is not None and weights not in BUILTIN_WEIGHTS:
        _fail("weights", weights, f"one of {', '.join(BUILTIN_WEIGHTS)} (the shipped folders) or null")
    if init == "random":
        if cfg.get("path") is not None:
            _fail("init", init, "pretrained when model.path is set (a folder's weights are never re-initialised)")
        if not cfg.get("arch"):
            _fail("arch", cfg.get("arch"), "an architecture mapping when model.init=random")
        if not isinstance(cfg.get("scheduler"), Mapping):
            _fail("scheduler", cfg.get("scheduler"), "a scheduler config mapping when model.init=random")
        if not _is_int(cfg.get("seed", 0)):
            _fail("seed", cfg.get("seed"), "an integer")
    elif not any(cfg.get(k) for k in ("path", "weights", "hub_id")):
        raise ValueError("model.init=pretrained needs a weight source: model.path (local diffusers folder), "
                         "model.weights (shipped folder) or model.hub_id; or set model.init=random")
    sched = cfg.get("scheduler")
    if sched is not None and not isinstance(sched, Mapping):
        _fail("scheduler", sched, "a DDPMScheduler/DDIMScheduler config mapping, or null (use the weights' one)")
    if not isinstance(cfg.get("local_files_only", False), bool):
        _fail("local_files_only", cfg.get("local_files_only"), "true or false")


def check_model_config(cfg: Mapping) -> None:
    """Validate a resolved `model` config group without loading anything; ValueError names the key."""
    cfg = plain(cfg)
    _check_keys(cfg)
    family = cfg["family"]
    if family not in MODELS:
        _fail("family", family, ", ".join(MODELS.names()))
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        _fail("name", cfg["name"], "a non-empty string")
    _check_shapes(cfg)
    _check_parts(cfg)
    ds = cfg.get("dataset")
    if ds is not None and ds not in DATASETS:
        _fail("dataset", ds, f"{', '.join(DATASETS)} or null")
    _check_source(cfg)
    _check_arch(cfg, MODELS.get(family))


def _random_net(cfg: Mapping, cls: type[ModelMixin]) -> ModelMixin:
    # fork_rng: building a model must not shift the caller's global random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.get("seed", 0))
        return cls(**cfg["arch"])


def _strict(loaded: tuple[Any, dict], what: str) -> Any:
    """The model of `from_pretrained(..., output_loading_info=True)`, or ValueError naming the tensors
    the checkpoint lacks or has in excess (the libraries only warn and initialise the gaps randomly)."""
    model, info = loaded
    problems = []
    for label in ("missing", "unexpected", "mismatched"):
        key = f"{label}_keys"
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
            problems.append(f"{len(names)} {label} tensors: {', '.join(names[:8])}{more}")
    if problems:
        raise ValueError(f"the checkpoint of {what} does not match its architecture: {'; '.join(problems)}. "
                         "Refusing to load it (the gaps would be random values); fix or replace the weight files")
    return model


def _check_class_name(config_file: Path, expected: tuple[str, ...], key: str) -> None:
    declared = json.loads(config_file.read_text()).get("_class_name")
    if declared is None:
        raise ValueError(f"{config_file} has no _class_name: not a diffusers config (save_pretrained writes it, "
                         f"e.g. \"_class_name\": \"{expected[0]}\"); refusing to guess what it holds")
    if declared not in expected:
        raise ValueError(f"{config_file} holds a {declared}, but {key} expects a {expected[0]}; "
                         f"fix {key} or model.path")


def _from_folder(root: Path, cfg: Mapping, cls: type[ModelMixin]) -> tuple[ModelMixin, dict | None, str]:
    net_dir, sched_file = local_layout(root, cfg["family"], cfg.get("subfolder"))
    _check_class_name(net_dir / "config.json", (cls.__name__, *LEGACY_CLASS_NAMES.get(cfg["family"], ())),
                      f"model.family={cfg['family']}")
    # low_cpu_mem_usage=False: what diffusers falls back to without accelerate anyway, minus its warning.
    net = _strict(cls.from_pretrained(net_dir, low_cpu_mem_usage=False, output_loading_info=True), str(net_dir))
    sched = json.loads(sched_file.read_text()) if sched_file else None
    return net, sched, str(sched_file) if sched_file else ""


def _hub_error(cfg: Mapping, sub: str | None, err: OSError) -> OSError:
    where = "the local Hugging Face hub cache" + ("" if cfg.get("local_files_only", False) else " and huggingface.co")
    return OSError(f"could not load model.hub_id={cfg['hub_id']!r} (subfolder={sub!r}): looked in {where} and "
                   f"found no weights ({err}). No model.path was set and no shipped folder matches; {HOW_TO_PROVIDE}")


def _from_hub(cfg: Mapping, cls: type[ModelMixin]) -> tuple[ModelMixin, dict | None, str]:
    hub_id, sub, local_only = cfg["hub_id"], cfg.get("subfolder"), cfg.get("local_files_only", False)
    try:
        net = _strict(cls.from_pretrained(hub_id, subfolder=sub, local_files_only=local_only, low_cpu_mem_usage=False,
                                          output_loading_info=True), f"hub:{hub_id}/{sub or ''}")
    except OSError as err:
        raise _hub_error(cfg, sub, err) from err
    for sched_sub in ("scheduler", None):
        try:
            sched = DDPMScheduler.load_config(hub_id, subfolder=sched_sub, local_files_only=local_only)
            return net, dict(sched), f"hub:{hub_id}/{sched_sub or ''}"
        except OSError:
            continue
    return net, None, ""


def _part_dir(root: Path, sub: str, why: str) -> Path:
    """root/sub, or FileNotFoundError naming the missing subfolder, before anything is sampled."""
    marker = "tokenizer_config.json" if sub == "tokenizer" else "config.json"
    if not (root / sub / marker).is_file():
        raise FileNotFoundError(f"model.path={str(root)!r} lacks {sub}/ ({sub}/{marker} not found): {why} needs "
                                f"it. A diffusers pipeline folder holds that part in {sub}/; {HOW_TO_PROVIDE}")
    return root / sub


def _load_net(cfg: Mapping, cls: type[ModelMixin]) -> tuple[ModelMixin, dict | None, str, str]:
    """(net, scheduler config stored with the weights or None, where that came from, source label)."""
    if cfg.get("init", "pretrained") == "random":
        return _random_net(cfg, cls), None, "", f"random(seed={cfg.get('seed', 0)})"
    root = weights_root(cfg)
    if cfg.get("path"):
        return *_from_folder(root, cfg, cls), f"path:{root}"
    if root is not None:
        if not root.is_dir():
            raise FileNotFoundError(f"the shipped weights folder {root} is missing (model.weights="
                                    f"{cfg['weights']!r}); train it with `{TRAIN_COMMAND[cfg['weights']]}` "
                                    f"or {HOW_TO_PROVIDE}")
        return *_from_folder(root, cfg, cls), "built-in"
    return *_from_hub(cfg, cls), f"hub:{cfg['hub_id']}"


def _load_part(cls: Any, cfg: Mapping, sub: str, why: str) -> Any:
    """A pipeline part from the local folder (strict) or the hub id's subfolder."""
    from transformers import CLIPTextModel, CLIPTokenizer  # here: only text pipelines load transformers' CLIP

    root = weights_root(cfg)
    if root is not None:
        folder = _part_dir(root, sub, why)
        if issubclass(cls, ModelMixin):
            _check_class_name(folder / "config.json", (cls.__name__,), why.split("=")[0])
            return _strict(cls.from_pretrained(folder, low_cpu_mem_usage=False, output_loading_info=True), str(folder))
        if cls is CLIPTextModel:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            if model_type != "clip_text_model":
                raise ValueError(f"{folder / 'config.json'} holds model_type={model_type!r}, but {why} expects a "
                                 "CLIPTextModel (model_type clip_text_model)")
            return _strict(cls.from_pretrained(folder, output_loading_info=True), str(folder))
        return cls.from_pretrained(folder)
    try:
        kwargs = {"subfolder": sub, "local_files_only": cfg.get("local_files_only", False)}
        if cls is CLIPTokenizer:
            return cls.from_pretrained(cfg["hub_id"], **kwargs)
        loaded = cls.from_pretrained(cfg["hub_id"], output_loading_info=True, **kwargs)
        return _strict(loaded, f"hub:{cfg['hub_id']}/{sub}")
    except OSError as err:
        raise _hub_error(cfg, sub, err) from err


def _scale_override(net: ModelMixin, cfg: Mapping, where: str) -> float | None:
    """model.decoder_scaling_factor where the checkpoint declares no scaling factor; None where it does.

    diffusers records the config keys it filled with defaults in `_use_default_values`: a missing
    scaling_factor silently becomes 0.18215 (the SD VAE's), which is wrong for CompVis's VQ LDMs (1.0)."""
    declared = "scaling_factor" not in (net.config.get("_use_default_values") or ())
    wanted = cfg.get("decoder_scaling_factor")
    if declared:
        if wanted is not None and not math.isclose(float(wanted), float(net.config.scaling_factor), rel_tol=1e-6):
            raise ValueError(f"the {cfg['decoder']} from {where} declares scaling_factor={net.config.scaling_factor}, "
                             f"but model.decoder_scaling_factor={wanted}: one is wrong (CompVis's VQ LDMs use 1.0, the "
                             "SD VAE 0.18215, also diffusers' default, which a converter may have written without "
                             "meaning it); fix the folder's config.json or model.decoder_scaling_factor")
        return None
    if wanted is None:
        raise ValueError(f"the {cfg['decoder']} config.json from {where} declares no scaling_factor (diffusers would "
                         "silently use 0.18215, the SD VAE's); set model.decoder_scaling_factor (1.0 for CompVis's "
                         "VQ LDMs, whose scale_factor defaults to 1.0)")
    return float(wanted)


def _load_decoder(cfg: Mapping, source: str) -> Decoder | None:
    kind = cfg.get("decoder")
    if not kind or cfg.get("init", "pretrained") == "random":
        return None
    net = _load_part(DECODER_CLASSES[kind], cfg, kind, f"model.decoder={kind}").eval()
    decoder = Decoder(kind, net, _scale_override(net, cfg, source))
    decoder.check(tuple(cfg["sample_shape"]), tuple(cfg["image_shape"]), source)
    return decoder


def _load_class_context(cfg: Mapping, source: str) -> ClassContext | None:
    """The learned class embedding of a class-conditional cross-attention UNet (random for init=random)."""
    if not cfg.get("class_embedder"):
        return None
    k, width = cfg["num_classes"], cfg["cond_shape"][1]
    if cfg.get("init", "pretrained") == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.get("seed", 0) + 1)
            return ClassContext(ClassEmbedder(num_classes=k, embedding_dim=width).eval())
    embedder = _load_part(ClassEmbedder, cfg, "class_embedder", f"model.class_embedder={cfg['class_embedder']}")
    found = [int(embedder.config.num_classes), int(embedder.config.embedding_dim)]
    if found != [k, width]:
        raise ValueError(f"the class embedder from {source} has {found[0]} classes (+ the null class) of width "
                         f"{found[1]}, but model.num_classes={k} and model.cond_shape={list(cfg['cond_shape'])}")
    return ClassContext(embedder.eval())


def _arch_differences(net: ModelMixin, cfg: Mapping) -> dict[str, dict[str, Any]]:
    """model.arch keys whose value differs from the loaded checkpoint's config (which is what runs)."""
    arch = cfg.get("arch") or {}
    loaded = {k: plain(v) for k, v in net.config.items()}
    return {k: {"yaml": v, "loaded": loaded.get(k)} for k, v in arch.items()
            if k in loaded and plain(v) != loaded[k]}


def _load_prompt_encoder(cfg: Mapping, source: str) -> PromptEmbeddings | None:
    if not cfg.get("text_encoder") or cfg.get("init", "pretrained") == "random":
        return None
    from transformers import CLIPTextModel, CLIPTokenizer

    why = f"model.text_encoder={cfg['text_encoder']}"
    encoder = _load_part(CLIPTextModel, cfg, "text_encoder", why).eval()
    tokenizer = _load_part(CLIPTokenizer, cfg, "tokenizer", why)
    states = [int(tokenizer.model_max_length), int(encoder.config.hidden_size)]
    if states != list(cfg["cond_shape"]):
        raise ValueError(f"the text encoder from {source} gives states {states} (tokenizer max length, hidden size), "
                         f"but model.cond_shape={list(cfg['cond_shape'])}; fix model.cond_shape")
    return PromptEmbeddings(encoder, tokenizer)


def _check_loaded(net: ModelMixin, cfg: Mapping, source: str) -> None:
    """A folder may hold a different model than the yaml describes: fail before sampling garbage."""
    c, h, _ = cfg["sample_shape"]
    in_ch, size = net.config.get("in_channels"), net.config.get("sample_size")
    if in_ch != c or (size is not None and size != h):
        raise ValueError(f"the net from {source} takes {in_ch} channels at size {size}, but "
                         f"model.sample_shape={list(cfg['sample_shape'])}; fix model.sample_shape")
    context = net.config.get("cross_attention_dim")
    if cfg["family"] == "unet_text" and context != cfg["cond_shape"][-1]:
        raise ValueError(f"the net from {source} cross-attends to width {context}, but model.cond_shape="
                         f"{list(cfg['cond_shape'])}; fix model.cond_shape")


def load_model(cfg: Mapping) -> DiffusionModel:
    """Build the DiffusionModel a resolved `model` config group describes (see the module docstring).

    Every part the config needs is loaded (and checked against the others) here, so a missing or
    broken part fails the run before any calibration or sampling. A prompt-conditioned pipeline still
    needs its prompt file: harness.models.conditions.bind_prompts."""
    cfg = plain(cfg)
    check_model_config(cfg)
    cls = MODELS.get(cfg["family"])
    net, sched, sched_where, source = _load_net(cfg, cls)
    _check_loaded(net, cfg, source)
    if sched is None:
        if cfg.get("scheduler") is None:
            raise ValueError(f"the weights from {source} carry no scheduler config (no scheduler/ subfolder) and "
                             "model.scheduler is null; set model.scheduler to a DDPMScheduler config mapping")
        sched, sched_where = dict(cfg["scheduler"]), "model.scheduler"
    decoder = _load_decoder(cfg, source)
    conditions = _load_prompt_encoder(cfg, source) or _load_class_context(cfg, source)
    net.eval()
    extra = {"scheduler_source": sched_where, "params": sum(p.numel() for p in net.parameters())}
    random = cfg.get("init", "pretrained") == "random"
    if random and (cfg.get("decoder") or cfg.get("text_encoder")):
        extra["parts"] = "random denoiser only: decoder / text encoder not loaded"
    if random and cfg.get("class_embedder"):
        extra["class_embedder"] = f"random (seed {cfg.get('seed', 0) + 1}), not loaded"
    differs = {} if random else _arch_differences(net, cfg)
    if differs:
        log.warning("model.arch of %s differs from the checkpoint's config.json (which is what runs): %s",
                    cfg["name"], differs)
        extra["arch_differs"] = differs
    # A class embedder's labels never reach the denoiser (it sees their embedding): num_classes stays
    # on the condition source, and the model is conditioned through cond_shape like a text model.
    labels_in = None if isinstance(conditions, ClassContext) else cfg.get("num_classes")
    return DiffusionModel(
        name=cfg["name"], family=cfg["family"], net=net, scheduler_config=sched,
        sample_shape=tuple(cfg["sample_shape"]), num_classes=labels_in,
        cond_shape=tuple(cfg["cond_shape"]) if cfg.get("cond_shape") is not None else None,
        guidance_scale=float(cfg.get("guidance_scale", 1.0)), dataset=cfg.get("dataset"), source=source,
        extra=extra, decoder=decoder, conditions=conditions,
    )
