"""Where a model config's files are, and the content fingerprint run identities take from them.

Kept free of torch and diffusers: a resumed run needs its run id (so the weights' fingerprint) and
nothing else, and must not pay for importing the engine. harness/models/zoo.py loads from the same
layout.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped folders (model.weights)

# Sub-folder of a diffusers pipeline folder that holds the denoiser, per family.
PIPELINE_SUBFOLDER = {"unet": "unet", "unet_text": "unet", "dit": "transformer"}

HOW_TO_PROVIDE = ("provide the weights as a local diffusers folder: model.path=/path/to/folder "
                  "(or run with network access to the Hugging Face hub)")

def plain(obj: Any) -> Any:
    """OmegaConf containers (or any mapping/sequence) -> plain dicts and lists, checked and fed to diffusers."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [plain(v) for v in obj]
    return obj


def local_layout(root: Path, family: str, subfolder: str | None) -> tuple[Path, Path | None]:
    """(folder of the denoiser's config.json, scheduler_config.json or None) of a local folder."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"model.path={str(root)!r} does not exist or is not a folder; expected a local diffusers folder "
            f"(config.json + diffusion_pytorch_model.safetensors, or a pipeline folder with "
            f"{PIPELINE_SUBFOLDER[family]}/ and scheduler/)")
    sub = subfolder or PIPELINE_SUBFOLDER[family]
    net_dir = root / sub if (root / sub / "config.json").is_file() else root
    if not (net_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {root / sub} nor in {root}: the folder lacks {sub}/ (the "
                                f"denoiser); {HOW_TO_PROVIDE}")
    for cand in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if cand.is_file():
            return net_dir, cand
    return net_dir, None


def weights_root(cfg: Mapping) -> Path | None:
    """The local folder a pretrained config loads (model.path, else the shipped model.weights), or None."""
    if cfg.get("path"):
        return Path(cfg["path"]).expanduser()
    return WEIGHTS_DIR / cfg["weights"] if cfg.get("weights") else None


def part_subfolders(cfg: Mapping) -> dict[str, str]:
    """{subfolder: the config key that needs it} of the parts besides the denoiser and scheduler."""
    if cfg.get("init", "pretrained") == "random":
        return {}  # a random denoiser alone: its parts are not loaded (architecture benchmarks)
    parts = {}
    if cfg.get("decoder"):
        parts[cfg["decoder"]] = f"model.decoder={cfg['decoder']}"
    if cfg.get("text_encoder"):
        parts["text_encoder"] = parts["tokenizer"] = f"model.text_encoder={cfg['text_encoder']}"
    if cfg.get("class_embedder"):
        parts["class_embedder"] = f"model.class_embedder={cfg['class_embedder']}"
    return parts


@functools.lru_cache(maxsize=64)
def files_sha256(files: tuple[tuple[str, int, int], ...], names: str = "basename") -> str:
    """sha256 over (name, bytes) of files; keyed on (path, size, mtime) so a process hashes once.
    `names`: "basename" (the denoiser's files, as run ids always hashed them) or "parent/basename"."""
    h = hashlib.sha256()
    for name, _, _ in files:
        p = Path(name)
        h.update((p.name if names == "basename" else f"{p.parent.name}/{p.name}").encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def file_stats(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def weights_fingerprint(cfg: Mapping) -> str:
    """What identifies the weights a config loads, without loading them (run ids need it cheaply).

    A local folder (model.path or a shipped one): a content hash of the denoiser's config and weight
    files and the scheduler config, plus every other part the config loads (decoder, text encoder,
    tokenizer), so retraining or replacing any of them gives new run ids instead of resuming stale
    records. Random init: its seed. A hub id: the id (the files are not local).
    """
    cfg = plain(cfg)
    if cfg.get("init", "pretrained") == "random":
        return f"random:{cfg.get('seed', 0)}"
    root = weights_root(cfg)
    if root is not None:
        if not root.is_dir():
            return f"missing:{root}"  # loading fails later with the full explanation
        net_dir, sched_file = local_layout(root, cfg["family"], cfg.get("subfolder"))
        files = sorted(f for f in net_dir.iterdir()
                       if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")))
        files += [sched_file] if sched_file else []
        denoiser = files_sha256(file_stats(files))
        parts = [f for sub in sorted(part_subfolders(cfg)) if (root / sub).is_dir()
                 for f in sorted((root / sub).iterdir())
                 if f.is_file() and f.suffix in (".json", ".txt", ".safetensors", ".bin", ".model")]
        return denoiser if not parts else f"{denoiser}+{files_sha256(file_stats(parts), 'parent/basename')}"
    return f"hub:{cfg.get('hub_id')}/{cfg.get('subfolder') or ''}"
