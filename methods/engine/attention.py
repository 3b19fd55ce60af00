"""Activation quantizers for the two matmuls inside diffusers attention.

The Q/K/V/output projections are Linear layers and get quantized like any other layer; what layer
swapping cannot reach are the operands of QK^T and of softmax(.)V. `QuantAttnProcessor` is a diffusers
attention processor (installed with `attn.set_processor`, no diffusers code is patched) that computes
attention explicitly and quantizes Q, K, the softmax output (unsigned grid: it lies in [0, 1]) and V.
Being an nn.Module, the processor registers as a submodule of the Attention, so its quantizers are
found by `act_quantizers`, calibrated, moved and saved with the network.
"""

from __future__ import annotations

import logging

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from methods.engine.modules import QuantSpec
from methods.engine.quantizer import ActQuantizer

log = logging.getLogger(__name__)

STANDARD_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


class QuantAttnProcessor(nn.Module):
    """Explicit attention with fake-quantized matmul operands (same maths as AttnProcessor2_0)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        if spec.act_bits is None:
            raise ValueError("attention quantization needs activation bits; got a32 (act_bits=None)")
        bits, sym, init = spec.act_bits, spec.act_symmetric, spec.act_init
        self.q_quantizer = ActQuantizer(bits, sym, range_init=init)
        self.k_quantizer = ActQuantizer(bits, sym, range_init=init)
        self.v_quantizer = ActQuantizer(bits, sym, range_init=init)
        self.softmax_quantizer = ActQuantizer(bits, symmetric=True, unsigned=True, range_init="minmax")

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Attention.forward drops (with a warning per call) any keyword the processor's __call__
        # signature does not name, and nn.Module's generic __call__ names none: spell them out.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = self.q_quantizer(query) @ self.k_quantizer(key).transpose(-1, -2) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = self.softmax_quantizer(scores.float().softmax(dim=-1).to(query.dtype))
        hidden_states = probs @ self.v_quantizer(value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def quantize_attention(net: nn.Module, spec: QuantSpec) -> list[str]:
    """Install a QuantAttnProcessor on every diffusers Attention of `net` (in place).

    Only attentions running the standard processors are converted (their maths is what
    QuantAttnProcessor reproduces); others (added KV projections, IP adapters, ...) keep their
    processor and are logged. Returns the names of the attention modules quantized; with a32 (no
    activation bits) there is nothing to quantize and the network is left as is.
    """
    if spec.act_bits is None:
        return []
    done: list[str] = []
    for name, module in net.named_modules():
        if not isinstance(module, Attention):
            continue
        if isinstance(module.processor, QuantAttnProcessor):  # already quantized: idempotent
            done.append(name)
            continue
        if not isinstance(module.processor, STANDARD_PROCESSORS) or module.added_kv_proj_dim is not None:
            log.warning("attention %s uses %s: its matmuls stay unquantized", name, type(module.processor).__name__)
            continue
        module.set_processor(QuantAttnProcessor(spec))
        done.append(name)
    return done
