"""Cache-based maintenance: serve precomputed, quantized temporal features instead of running the TIB.

A temporal feature is a function of (timestep, label) alone, and a sampler visits finitely many of
those, so every value the network will ever need can be computed once with the FP TIB, quantized to
the activation bit width with one (scale, zero point) per timestep, and stored. The cache module sits
at the feature's module name (`<resnet>.time_emb_proj`, DiT's `norm1.linear`), so hooks on that name
keep working; it ignores its input and returns the feature of the current timestep and label (read
from the published call context). When every feature is cached, the embedders are replaced by a
stub, which removes the TIB's compute and its weight-quantization error.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from harness.models.base import DiffusionModel, denoise
from methods.engine.context import current_timesteps
from methods.engine.modules import QuantLayer
from methods.engine.quantizer import UniformQuantizer
from methods.temporal.labels import current_labels
from methods.temporal.tib import TIB, iter_schedule, label_axis

log = logging.getLogger(__name__)


def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    return torch.int16 if qmin >= -(2**15) and qmax < 2**15 else torch.int32


class TemporalFeatureCache(nn.Module):
    """The quantized values of one temporal feature at every (timestep, label) of the sampler.

    Holds (n_timesteps, n_labels, dim) codes (n_labels = 1 for a label-free TIB), filled one timestep
    at a time by `fill`. With `bits` the codes are integers with one (scale, zero point) per timestep
    (min-max over that timestep's labels and channels); with `bits=None` (a32) FP values are stored.
    """

    def __init__(self, timesteps: list[int], labels: list[int] | None, dim: int, bits: int | None,
                 symmetric: bool = False, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        n_t, n_l = len(timesteps), max(1, len(labels or []))
        dtype = torch.float32 if bits is None else _code_dtype(self._grid().qmin, self._grid().qmax)
        self.register_buffer("timesteps", torch.tensor(timesteps, dtype=torch.long, device=device))
        self.register_buffer("labels", torch.tensor(labels or [], dtype=torch.long, device=device))
        self.register_buffer("codes", torch.zeros(n_t, n_l, dim, dtype=dtype, device=device))
        self.register_buffer("scale", torch.ones(n_t, device=device))
        self.register_buffer("zero_point", torch.zeros(n_t, device=device))

    def _grid(self) -> UniformQuantizer:
        return UniformQuantizer(self.bits, symmetric=self.symmetric)

    @torch.no_grad()
    def fill(self, timestep: int, values: torch.Tensor) -> None:
        """Store the FP feature at `timestep` for every label: `values` is (n_labels, dim)."""
        i = int(torch.nonzero(self.timesteps == timestep)[0, 0])
        values = values.detach().float().reshape(self.codes.shape[1:])
        if self.bits is None:
            self.codes[i] = values
            return
        grid = self._grid()
        scale, zp = grid.params_from_range(values.min().reshape(1), values.max().reshape(1))
        self.codes[i] = torch.clamp(torch.round(values / scale) + zp, grid.qmin, grid.qmax).to(self.codes.dtype)
        self.scale[i], self.zero_point[i] = scale[0], zp[0]

    @property
    def nbytes(self) -> int:
        """Memory of what is stored: codes plus per-timestep parameters and keys."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def values_at(self, timestep: int) -> torch.Tensor:
        """(n_labels, dim): the values served at `timestep`, for every label."""
        i = int(torch.nonzero(self.timesteps == timestep)[0, 0])
        return (self.codes[i].float() - self.zero_point[i]) * self.scale[i]

    def _positions(self, keys: torch.Tensor, wanted: torch.Tensor, batch: int, what: str) -> torch.Tensor:
        wanted = wanted.to(keys.device)
        wanted = wanted.expand(batch) if wanted.numel() == 1 else wanted
        match = wanted[:, None] == keys[None, :]
        found = match.any(dim=1)
        if not bool(found.all()):
            missing = sorted(set(wanted[~found].tolist()))
            raise ValueError(
                f"temporal feature cache has no entry for {what} {missing}: it was built for {what}s "
                f"{keys.tolist()}. Sample with the same sampler (name, steps) and labels as calibration"
            )
        return match.float().argmax(dim=1)

    def lookup(self, timestep_index: torch.Tensor, label_index: torch.Tensor) -> torch.Tensor:
        """(B, dim) dequantized features at row positions; pure tensor ops, so an exporter can trace it
        with the positions as graph inputs."""
        codes = self.codes[timestep_index, label_index].float()
        return (codes - self.zero_point[timestep_index, None]) * self.scale[timestep_index, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_tracing():
            raise RuntimeError("TemporalFeatureCache reads the timestep and label from the call context, which "
                               "a trace would freeze into constants; exporters must feed the positions as inputs "
                               "and call `lookup`")
        batch = x.shape[0]
        t = current_timesteps()
        if t is None:
            raise RuntimeError("cached temporal features are served only inside a denoiser call "
                               "(install_timestep_context on the network) or a timestep_scope")
        ti = self._positions(self.timesteps, t, batch, "timestep")
        if self.labels.numel():
            lab = current_labels()
            if lab is None:
                raise RuntimeError("this cache is keyed by class label but the call published none: "
                                   "install_label_context on the network, or use label_scope")
            li = self._positions(self.labels, lab, batch, "label")
        else:
            li = torch.zeros_like(ti)
        return self.lookup(ti, li).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"timesteps={self.timesteps.numel()}, labels={self.labels.numel()}, dim={self.codes.shape[-1]}, "
                f"codes={self.codes.dtype}, bytes={self.nbytes}")


class SkippedEmbedding(nn.Module):
    """Stands in for an embedder whose every consumer reads a cache: returns zeros, costs nothing.

    The output is never used (the caches ignore their input); it only keeps the shapes the
    surrounding diffusers code expects.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        batch = max(a.shape[0] if a.dim() else 1 for a in tensors)
        ref = tensors[0]
        dtype = kwargs.get("hidden_dtype") or torch.float32
        return torch.zeros(batch, self.dim, dtype=dtype, device=ref.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@torch.no_grad()
def build_caches(fp_net: nn.Module, tib: TIB, names: list[str], schedule: list[int], labels: list[int],
                 bits: int | None, symmetric: bool = False) -> dict[str, TemporalFeatureCache]:
    """Caches of the FP TIB's features `names` over every (timestep, label) of the sampler."""
    axis = label_axis(tib, labels)
    keys = None if axis == [None] else [int(v) for v in axis]
    device = next(fp_net.parameters()).device
    caches: dict[str, TemporalFeatureCache] = {}
    for ts, feats in iter_schedule(fp_net, tib, schedule, labels):
        for name in names:
            if name not in caches:
                caches[name] = TemporalFeatureCache(schedule, keys, feats[name].shape[-1], bits, symmetric, device)
            caches[name].fill(ts, feats[name])
    return caches


def install_caches(net: nn.Module, caches: dict[str, TemporalFeatureCache]) -> int:
    """Put each cache at its feature's module name (replacing the projection); returns total bytes."""
    for name, cache in caches.items():
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, cache)
    return sum(c.nbytes for c in caches.values())


def _out_features(layer: nn.Module) -> int:
    return int((layer.layer if isinstance(layer, QuantLayer) else layer).out_features)


def _embedding_dim(net: nn.Module, tib: TIB, name: str) -> int:
    module = net.get_submodule(name)
    if tib.family == "dit":
        return _out_features(module.timestep_embedder.linear_2)
    if isinstance(module, nn.Embedding):
        return int(module.embedding_dim)
    return _out_features(module.linear_2)


@torch.no_grad()
def skip_embedders(model: DiffusionModel, tib: TIB, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
                   ) -> bool:
    """Replace the TIB's embedders by stubs when every feature is served by a cache.

    Safe only if nothing else reads the embedding (e.g. an AdaGroupNorm would): a probe call is made
    with and without the stubs, and the stubs are removed again (logged) if the output changes.
    Returns whether the embedders are skipped.
    """
    net = model.net
    reference = denoise(model, *probe)
    originals = {name: net.get_submodule(name) for name in tib.embedders}
    for name in tib.embedders:
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child,
                SkippedEmbedding(_embedding_dim(net, tib, name)))
    if torch.allclose(denoise(model, *probe), reference, rtol=1e-5, atol=1e-6):
        return True
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, module)
    log.warning("the time embedding has consumers besides the cached features; TIB compute is kept")
    return False


def cache_bytes(net: nn.Module) -> int:
    """Memory of every temporal feature cache in `net` (count it with the weights)."""
    return sum(m.nbytes for m in net.modules() if isinstance(m, TemporalFeatureCache))
