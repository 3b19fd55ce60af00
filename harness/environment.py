"""Provenance of a run: package versions, code revision, machine, so a number can be traced back.

Latency and int8 speed depend on the CPU's vector extensions (AVX2 vs VNNI/AMX) and on the thread
count, so those go into every record next to the versions and the git commit. They also depend on
what else runs: `machine_load` snapshots the load average and the other harness processes at the
start and end of a run's timed phases, and `under_load` says whether its timings were contended.
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
# A command line that runs the harness: run.py (Hydra), python -m harness.<module>, or the bench.
HARNESS_CMD = re.compile(r"(^|[\s/])run\.py(\s|$)|-m\s+harness(\.|\s|$)")
# Load average per logical core above which timings count as measured under contention.
LOAD_PER_CORE_LIMIT = 1.0


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
        "placement": placement(),
    }


def placement() -> dict[str, Any]:
    """Where this job ran when a sweep is spread over processes and machines (docs/scaleout.md): host,
    pid, torchrun rank / world size and its device, the Hydra launcher and job number, the SLURM job."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0"))
    launcher, job_num = None, None
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        launcher = str(hc.launcher.get("_target_", "")).rsplit(".", 1)[-1] or None
        job_num = hc.job.get("num")
    except (ImportError, ValueError):  # run() called without Hydra
        pass
    return {
        "host": socket.gethostname(), "pid": os.getpid(),
        "rank": int(env.get("RANK", "0")), "local_rank": local_rank, "world_size": int(env.get("WORLD_SIZE", "1")),
        "device": f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu",  # what device=auto picks
        "launcher": launcher, "hydra_job_num": job_num, "torchrun": "TORCHELASTIC_RUN_ID" in env,
        "slurm_job_id": env.get("SLURM_JOB_ID"), "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT"),  # > 0: requeued after preemption
    }


def _harness_commands() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process, from psutil if installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    procs: dict[int, tuple[int, str]] = {}
    if psutil is not None:
        for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
            procs[p.info["pid"]] = (p.info["ppid"] or 0, " ".join(p.info["cmdline"] or []))
        return procs
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not readable
        procs[int(entry.name)] = (ppid, cmd)
    return procs


def other_harness_processes() -> int:
    """Harness processes on this machine other than this one and its ancestors (e.g. a second sweep)."""
    procs = _harness_commands()
    mine, pid = set(), os.getpid()
    while pid and pid not in mine:
        mine.add(pid)
        pid = procs.get(pid, (0, ""))[0]
    return sum(1 for pid, (_, cmd) in procs.items() if pid not in mine and HARNESS_CMD.search(cmd))


def machine_load() -> dict[str, Any]:
    """A snapshot of contention: load average (1, 5, 15 min), logical cores, other harness processes."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        load = None
    return {"loadavg": load, "cpu_count": os.cpu_count(), "other_harness_processes": other_harness_processes()}


def under_load(snapshots: dict[str, dict[str, Any]]) -> bool:
    """True when any snapshot saw another harness process, or a 1-min load average above the cores."""
    for snap in snapshots.values():
        if snap.get("other_harness_processes", 0) > 0:
            return True
        load, cores = snap.get("loadavg"), snap.get("cpu_count") or 1
        if load and load[0] > LOAD_PER_CORE_LIMIT * cores:
            return True
    return False
