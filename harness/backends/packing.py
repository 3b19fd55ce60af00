"""Weight storage at the target bit-width: int8 as is, 4-bit (and below) two codes per byte.

Packing is what makes W4 weights take half the bytes of W8 on disk and in memory; kernels that have
no 4-bit path get the codes unpacked to int8 once, at prepare time (the packed form is what is
stored and reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NIBBLE_BITS = 4


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7] (any shape) -> uint8, two per byte (low nibble first), padded."""
    flat = codes.flatten().to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError(f"int4 packing takes codes in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat & 0xF).to(torch.uint8)
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_int4: uint8 bytes -> int8 codes of `shape` (sign-extended nibbles)."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=1).flatten()
    both = (both ^ 8) - 8
    n = 1
    for s in shape:
        n *= int(s)
    return both[:n].to(torch.int8).reshape(shape)


@dataclass
class PackedWeight:
    """Codes stored at their bit-width (<= 4 bits: nibble-packed; else int8) plus their shape."""

    data: torch.Tensor
    shape: tuple[int, ...]
    bits: int

    @classmethod
    def pack(cls, codes: torch.Tensor, bits: int) -> PackedWeight:
        data = pack_int4(codes) if bits <= NIBBLE_BITS else codes.to(torch.int8).flatten().clone()
        return cls(data, tuple(codes.shape), bits)

    def unpack(self) -> torch.Tensor:
        if self.bits <= NIBBLE_BITS:
            return unpack_int4(self.data, self.shape)
        return self.data.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
