"""The shared artifact cache: content addressing, checksums, atomic rebuilds."""

import json
import os
from pathlib import Path

import pytest
import torch

from harness.artifacts import BUILDS_LOG, ArtifactCache, stable_hash, tensors_fingerprint


def test_stable_hash_ignores_key_order_and_sees_values() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


def test_fingerprint_changes_with_weights() -> None:
    sd = {"w": torch.ones(3)}
    fp1 = tensors_fingerprint(sd)
    sd["w"][0] = 2.0
    assert tensors_fingerprint(sd) != fp1


def test_built_once_then_cached(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(6.0).reshape(2, 3)}

    a = cache.get_or_build("demo", {"n": 2}, build)
    b = cache.get_or_build("demo", {"n": 2}, build)
    assert len(calls) == 1 and torch.equal(a["x"], b["x"])
    cache.get_or_build("demo", {"n": 3}, build)
    assert len(calls) == 2, "different dependencies must be a different artifact"
    assert not list(tmp_path.rglob("*.tmp")), "no temp files left behind"


def test_corrupted_file_is_detected_and_rebuilt(tmp_path: Path) -> None:
    cache, calls = ArtifactCache(tmp_path), []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.randn(64, 64)}

    cache.get_or_build("demo", {}, build)
    path = cache.path("demo", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert cache.load("demo", {}) is None
    cache.get_or_build("demo", {}, build)
    assert len(calls) == 2
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")  # bit rot, same length
    assert cache.load("demo", {}) is None


def test_builds_are_counted_and_loads_are_not(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    cache.get_or_build("demo", {"n": 1}, lambda: {"x": torch.ones(1)})
    cache.get_or_build("demo", {"n": 1}, lambda: {"x": torch.ones(1)})
    assert cache.builds == ["demo"], "a run's report lists what it built, not what it loaded"
    lines = [json.loads(line) for line in (tmp_path / BUILDS_LOG).read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["demo"] and lines[0]["pid"] == os.getpid()
    other = ArtifactCache(tmp_path)  # another job: loads, builds nothing
    assert torch.equal(other.get_or_build("demo", {"n": 1}, lambda: {})["x"], torch.ones(1)) and other.builds == []


def test_unknown_lock_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"<paths.lock_mode=flock>.*os, nfs"):
        ArtifactCache(tmp_path, lock_mode="flock").get_or_build("demo", {}, lambda: {"x": torch.ones(1)})
