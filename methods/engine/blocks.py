"""Where the structure of a diffusers denoiser lives: reconstruction units and skip-concat splits.

Reconstruction units are the blocks diffusers itself defines (ResNet blocks, attention / transformer
blocks, up- and down-samplers), so BRECQ's "block" means the same thing on every model; quantized
layers outside any block (input conv, time-embedding linears, output conv, DiT's final projections)
become single-layer units. Split quantization (Q-Diffusion) needs the channel index where a UNet up
block concatenates the skip connection onto the hidden state; it is read off one real forward call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from methods.engine.modules import QuantLayer

BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    ResnetBlock2D,
    Transformer2DModel,
    BasicTransformerBlock,
    Attention,
    Downsample2D,
    Upsample2D,
)


def _has_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, QuantLayer) or any(isinstance(m, QuantLayer) for m in module.modules())


def _interleave(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Registration order lists a UNet block's attentions before (or after) its resnets; execution
    alternates resnets[i], attentions[i]. Sort siblings `<p>.resnets.i` / `<p>.attentions.i` that way,
    at the position of the first of them; every other unit keeps its position."""
    first: dict[str, int] = {}
    keys: list[tuple[int, int, bool]] = []
    for pos, (name, _) in enumerate(units):
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in ("resnets", "attentions") and parts[2].isdigit():
            start = first.setdefault(parts[0], pos)
            keys.append((start, int(parts[2]), parts[1] == "attentions"))
        else:
            keys.append((pos, -1, False))
    order = sorted(range(len(units)), key=lambda i: keys[i])
    return _mid_before_up([units[i] for i in order])


def _mid_before_up(units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """diffusers UNets register up_blocks before mid_block but run the mid block first."""
    mid = [u for u in units if u[0].startswith("mid_block.")]
    rest = [u for u in units if not u[0].startswith("mid_block.")]
    at = next((i for i, (n, _) in enumerate(rest) if n.startswith("up_blocks.")), len(rest))
    return rest[:at] + mid + rest[at:]


def _run_hooked(handles: list[torch.utils.hooks.RemovableHandle], run: Callable[[], object]) -> None:
    """One no-grad forward pass with temporary hooks installed; the hooks are removed even on error."""
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()


def find_blocks(net: nn.Module, order_by: Callable[[], object] | None = None) -> list[tuple[str, nn.Module]]:
    """Reconstruction units of `net` in execution order: (module name, module).

    Outermost diffusers blocks of `BLOCK_TYPES`, plus QuantLayers outside any block. Units without a
    QuantLayer (e.g. a pooling downsampler, or a block kept entirely in FP) are left out: there is
    nothing to reconstruct. The static order is registration order with resnets and attentions of a
    UNet block interleaved and the mid block before the up blocks; `order_by`, a callable that runs
    one forward pass of `net`, replaces it by the observed order of first calls (units never called
    go last).
    """
    units: list[tuple[str, nn.Module]] = []
    inside: str | None = None
    for name, module in net.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(module, BLOCK_TYPES) and name:
            inside = name + "."
            if _has_quant_layer(module):
                units.append((name, module))
        elif isinstance(module, QuantLayer):
            inside = name + "."
            units.append((name, module))
    units = _interleave(units)
    if order_by is not None:
        units = _observed_order(units, order_by)
    return units


def _observed_order(units: list[tuple[str, nn.Module]], run: Callable[[], object]) -> list[tuple[str, nn.Module]]:
    seen: dict[str, int] = {}
    handles = []
    for name, module in units:

        def pre(_m: nn.Module, _a: tuple, name: str = name) -> None:
            seen.setdefault(name, len(seen))

        handles.append(module.register_forward_pre_hook(pre))
    _run_hooked(handles, run)
    return sorted(units, key=lambda u: seen.get(u[0], len(units) + len(seen)))


def skip_splits(net: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """Channel index where each up-block resnet's input switches from hidden state to skip connection.

    UNet up blocks take `res_hidden_states_tuple` and feed resnet i with cat([hidden, skips[-1 - i]]),
    so the split is resnet i's in_channels minus that skip's channels. Returns {resnet name: split};
    `run` performs one forward pass of `net`.
    """
    skips: dict[str, list[int]] = {}
    handles = []
    for name, module in net.named_modules():
        if "res_hidden_states_tuple" not in inspect.signature(module.forward).parameters:
            continue

        def pre(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if res is not None and name not in skips:
                skips[name] = [int(r.shape[1]) for r in res]

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    _run_hooked(handles, run)
    splits: dict[str, int] = {}
    for name, channels in skips.items():
        resnets = getattr(net.get_submodule(name), "resnets", [])
        for i, resnet in enumerate(resnets):
            if isinstance(resnet, ResnetBlock2D) and i < len(channels):
                splits[f"{name}.resnets.{i}"] = resnet.in_channels - channels[-1 - i]
    return splits


def enable_skip_split(net: nn.Module, splits: dict[str, int], weights: bool = False) -> list[str]:
    """Give conv1 and conv_shortcut of each up-block resnet a separate quantizer for the skip half
    (and, with `weights`, a separate weight grid for its input channels, as Q-Diffusion's reference).

    Returns the names of the layers that got one (layers kept in FP have no quantizer to split)."""
    done: list[str] = []
    for resnet_name, split in splits.items():
        resnet = net.get_submodule(resnet_name)
        for child in ("conv1", "conv_shortcut"):
            layer = getattr(resnet, child, None)
            if isinstance(layer, QuantLayer) and layer.act_quantizer is not None and 0 < split:
                layer.enable_split(split, weights)
                done.append(f"{resnet_name}.{child}")
    return done
