"""LeNet-5 features for MNIST-like models: the MNIST stand-in for Inception.

The pretrained weights are the clean-trained MNIST LeNet-5 that the advertorch sdist installs as
advertorch_examples/trained_models/mnist_lenet5_clntrained.pt (a plain state dict; `import
advertorch` itself fails on current torch, so only the file is read, with weights_only=True).

Views: pooled = the 200-d hidden layer after its ReLU (what the classifier head sees; the usual
MNIST-FID space), spatial = the first `spatial_channels` channels of the last conv block's output
map (64 x 7 x 7 after ReLU and pooling), flattened: the sFID analogue, cut to a few channels as the
guided-diffusion evaluator cuts Inception's mixed_6/conv to 7 so its covariance stays cheap; logits
= the 10 classes (IS, class accuracy).
"""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.metrics.features import EXTRACTORS, FeatureExtractor, Features, to_uint8

WEIGHTS_PACKAGE = "advertorch_examples"
WEIGHTS_FILE = "trained_models/mnist_lenet5_clntrained.pt"
IMAGE_SHAPE = (1, 28, 28)


def default_weights_path() -> Path:
    """Where the advertorch sdist put the pretrained LeNet-5 state dict."""
    spec = find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MNIST LeNet-5 weights ship with the advertorch sdist ({WEIGHTS_PACKAGE}/{WEIGHTS_FILE}); "
            "install it with `pip install --no-deps advertorch` or pass weights=<path to the .pt state dict>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE


class LeNet5(nn.Module):
    """conv3x3(1->32) -> ReLU -> pool2 -> conv3x3(32->64) -> ReLU -> pool2 -> fc 3136->200 -> ReLU -> fc 200->10.

    Parameter names match the advertorch state dict. Inputs in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.linear1 = nn.Linear(7 * 7 * 64, 200)
        self.linear2 = nn.Linear(200, 10)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(last conv map (N, 64, 7, 7), hidden (N, 200), logits (N, 10))."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        conv = F.max_pool2d(F.relu(self.conv2(h)), 2)
        hidden = F.relu(self.linear1(conv.flatten(1)))
        return conv, hidden, self.linear2(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.views(x)[2]


def load_lenet(weights: str | Path | None = None) -> tuple[LeNet5, str]:
    """The pretrained LeNet-5 (eval mode, frozen) and the sha256 of its weights file."""
    path = Path(weights) if weights is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"LeNet-5 weights not found at {path}; expected the advertorch state dict "
                                f"{WEIGHTS_FILE} (pip install --no-deps advertorch)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = LeNet5()
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    return net, hashlib.sha256(path.read_bytes()).hexdigest()


class LeNetExtractor(FeatureExtractor):
    """LeNet-5 features of 1 x 28 x 28 images in [-1, 1]."""

    name = "lenet"

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu",
                 spatial_channels: int = 7) -> None:
        if not 1 <= spatial_channels <= 64:
            raise ValueError(f"<spatial_channels={spatial_channels}> must be in 1..64 (LeNet's last conv has 64)")
        self.net, self.weights_sha256 = load_lenet(weights)
        self.device = torch.device(device)
        self.net.to(self.device)
        self.spatial_channels = spatial_channels

    def extract_batch(self, images: torch.Tensor) -> Features:
        if tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"the LeNet extractor takes MNIST-shaped images {IMAGE_SHAPE}, got "
                             f"{tuple(images.shape[1:])}; use extractor=inception for other datasets")
        x = to_uint8(images).float() / 255
        conv, hidden, logits = self.net.views(x)
        spatial = conv[:, : self.spatial_channels].flatten(1)
        return Features(hidden.float().cpu(), spatial.float().cpu(), logits.float().cpu())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_sha256,
                "spatial_channels": self.spatial_channels, "input": "uint8-rounded [-1,1] -> [0,1]"}


EXTRACTORS.register("lenet")(LeNetExtractor)
