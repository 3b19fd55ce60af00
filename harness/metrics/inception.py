"""InceptionV3 features, the papers' protocol (FID / sFID / IS), through torch-fidelity's network.

The network is torch-fidelity's `FeatureExtractorInceptionV3`, the PyTorch port of the TF graph
(inception-2015-12-05) that the FID / IS papers and the guided-diffusion evaluator use. Views:
pooled = pool_3 (2048), logits = the 1008 unbiased logits torch-fidelity uses for IS, spatial = the
first 7 channels of mixed_6/conv (Mixed_6d.branch1x1, 17 x 17), flattened in TF's (H, W, C) order:
the guided-diffusion evaluator's sFID features (2023-d).

Resizing to 299 follows clean-fid's modes: `legacy_tensorflow` (default; torch-fidelity's in-network
TF1-exact bilinear resize, the protocol the papers report), `clean` (clean-fid's PIL bicubic) or
`legacy_pytorch` (clean-fid's torch bilinear). torch-fidelity's network takes uint8, so the
clean-fid resizes are rounded back to 8 bits (at most half a grey level off clean-fid's floats).

Weights: `eval.inception_weights`, or the torch hub cache torch-fidelity downloads to, or a download
when the machine has network. torch-fidelity itself reads weight files with weights_only=False; here
its constructor gets an empty placeholder and the real state dict is loaded with weights_only=True.
"""

from __future__ import annotations

import hashlib
import io
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from harness.metrics.features import EXTRACTORS, FeatureExtractor, Features, to_uint8

if TYPE_CHECKING:  # torch-fidelity (and torchvision.models under it) loads only when Inception is used
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

ResizeMode = Literal["legacy_tensorflow", "clean", "legacy_pytorch"]
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
# pytorch-fid's conversion of the same TF graph; its state dict has the same keys and shapes.
PYTORCH_FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
SPATIAL_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
POOLED, LOGITS = "2048", "logits_unbiased"


def weights_cache_dir() -> Path:
    """Where torch-fidelity (torch.hub) keeps downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(weights: str | Path | None, download: bool = True) -> Path:
    """The InceptionV3 weights file: the given path, the hub cache, or a fresh download."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    target = weights_cache_dir() / WEIGHTS_FILE
    how = (f"place torch-fidelity's {WEIGHTS_FILE} (from {URL_INCEPTION_V3}) at {target}, or set "
           f"eval.inception_weights=/path/to/{WEIGHTS_FILE} (pytorch-fid's {PYTORCH_FID_WEIGHTS_FILE} also works)")
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"<eval.inception_weights={weights}> is not a file; {how}")
        return path
    for name in (WEIGHTS_FILE, PYTORCH_FID_WEIGHTS_FILE):
        if (weights_cache_dir() / name).is_file():
            return weights_cache_dir() / name
    if download:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
            return target
        except OSError as err:  # URLError is an OSError: offline, proxy, DNS
            raise FileNotFoundError(f"InceptionV3 FID weights are not on this machine and the download "
                                    f"failed ({err}); {how}") from err
    raise FileNotFoundError(f"InceptionV3 FID weights not found; {how}")


@cache
def _network_class() -> type[FeatureExtractorInceptionV3]:
    """torch-fidelity's network with its own weight loading turned into a no-op placeholder."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _TorchFidelityInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False) -> Any:
            if not state_dict:  # the placeholder its constructor loads; real weights come after
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _TorchFidelityInception


def build_network(state_dict: dict[str, torch.Tensor] | None, seed: int = 0) -> FeatureExtractorInceptionV3:
    """torch-fidelity's InceptionV3 with `state_dict`, or randomly initialised (tests) when None.

    The random init uses He-normal convolutions: PyTorch's default init makes the 2048-d features of
    this 90-layer net vanish (~1e-8), useless even for smoke tests.
    """
    placeholder = io.BytesIO()
    torch.save({}, placeholder)
    placeholder.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _network_class()("inception-v3-compat", [POOLED, LOGITS], feature_extractor_weights_path=placeholder)
        if state_dict is None:
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    if state_dict is not None:
        expected = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        got = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        if got != expected:
            wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
            raise ValueError(f"not an InceptionV3 FID state dict: missing {sorted(expected.keys() - got.keys())[:5]}, "
                             f"unexpected {sorted(got.keys() - expected.keys())[:5]}, wrong shapes {wrong[:5]}; "
                             f"expected torch-fidelity's {WEIGHTS_FILE}")
        nn.Module.load_state_dict(net, state_dict, strict=False)  # num_batches_tracked may be absent
    return net.eval().requires_grad_(False)


class InceptionExtractor(FeatureExtractor):
    """InceptionV3 pool_3 / mixed_6 / logit features of RGB or grayscale images in [-1, 1]."""

    name = "inception"

    def __init__(self, weights: str | Path | None = None, resize: ResizeMode = "legacy_tensorflow",
                 device: str | torch.device = "cpu", download: bool = True, random_init: bool = False,
                 seed: int = 0) -> None:
        """`random_init=True` builds the same network with random weights: for tests and smoke runs
        only, its metrics mean nothing (recorded in `describe()`)."""
        if resize not in get_args(ResizeMode):
            raise ValueError(f"<eval.resize={resize!r}> is not a resize mode; accepted: {get_args(ResizeMode)}")
        self.resize: ResizeMode = resize
        if random_init:
            self.weights_id = f"random-he-normal-seed{seed}"
            state = None
        else:
            path = resolve_weights(weights, download)
            self.weights_id = hashlib.sha256(path.read_bytes()).hexdigest()
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.net = build_network(state, seed)
        self.device = torch.device(device)
        self.net.to(self.device)
        self._spatial: list[torch.Tensor] = []
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(
            lambda _m, _i, out: self._spatial.append(out[:, :SPATIAL_CHANNELS])
        )

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> uint8 (N, 3, 299, 299) with clean-fid's resizer (legacy_tensorflow:
        untouched, the network resizes TF1-style itself)."""
        if self.resize == "legacy_tensorflow":
            return x
        from cleanfid.resize import build_resizer

        fn = build_resizer(self.resize)
        out = [fn(img) for img in x.permute(0, 2, 3, 1).cpu().numpy()]
        arr = np.round(np.stack(out)).clip(0, 255).astype(np.uint8)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).to(x.device)

    def extract_batch(self, images: torch.Tensor) -> Features:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes RGB or grayscale images, got {images.shape[1]} channels")
        x = to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        self._spatial.clear()
        pooled, logits = self.net(self._resize(x))
        spatial = self._spatial.pop().permute(0, 2, 3, 1).flatten(1)  # TF (H, W, C) order, as the evaluator
        return Features(pooled.float().cpu(), spatial.float().cpu(), logits.float().cpu())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights_sha256": self.weights_id, "resize": self.resize,
                "network": "torch-fidelity FeatureExtractorInceptionV3", "spatial": f"{SPATIAL_MODULE}[:7]"}


EXTRACTORS.register("inception")(InceptionExtractor)
