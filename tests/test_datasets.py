"""The offline MNIST loader: shapes, ranges, class balance, and that the in-memory cache is not shared."""

import torch

from harness.datasets import load_mnist


def test_load_mnist_shapes_ranges_and_labels() -> None:
    images, labels = load_mnist()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.long
    assert images.min() == 0.0 and images.max() == 1.0
    # MNIST digits are mostly background: mean ink ~0.13 (a wrong column split or scale breaks this).
    assert 0.08 < images.mean().item() < 0.2
    assert torch.bincount(labels).tolist() == [500] * 10
    # The label column is not a pixel: a 0-digit and a 1-digit differ in ink, as real digits do.
    zeros, ones = images[labels == 0].mean(), images[labels == 1].mean()
    assert zeros > ones


def test_load_mnist_returns_copies_of_the_cache() -> None:
    images, labels = load_mnist()
    images.zero_()
    labels.fill_(3)
    again, again_labels = load_mnist()
    assert again.max() == 1.0
    assert torch.bincount(again_labels).tolist() == [500] * 10
