"""Provenance of a run: package versions, code revision, machine, so a number can be traced back.

Latency and int8 speed depend on the CPU's vector extensions (AVX2 vs VNNI/AMX) and on the thread
count, so those go into every record next to the versions and the git commit.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("python", "torch", "torchvision", "diffusers", "torch-fidelity", "clean-fid", "wandb",
            "openvino", "hydra-core", "omegaconf", "pandas", "numpy")
# Flags that decide which int8 / low-precision kernels a CPU can run fast.
CPU_FLAG_PATTERN = re.compile(r"^(avx2|avx512.*|.*vnni.*|amx.*|fma|f16c)$")
REPO_ROOT = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    """Installed versions (None where a package is absent); read from metadata, not by importing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES[1:]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD commit and whether the working tree differs from it; nulls outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first_cpu = text.split("\n\n", 1)[0]
    pairs = (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_facts() -> dict[str, Any]:
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "flags": sorted(f for f in flags if CPU_FLAG_PATTERN.match(f)),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(),
    }


def collect_environment() -> dict[str, Any]:
    """The environment block of a run record (JSON-serialisable)."""
    cpu = cpu_facts()
    cuda = torch.cuda.is_available()
    return {
        "versions": package_versions(),
        "git": git_state(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if cuda else cpu["model"],
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
    }
