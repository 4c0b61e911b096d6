"""Pack a boolean tensor into bits (8 per byte) and back: 1/32 of a float32 map."""

from __future__ import annotations

import torch
from torch import Tensor

# Multiplying a little-endian word of eight 0/1 bytes by this constant gathers byte i
# into bit i of the top byte (the classic multiply-and-shift bit gather).
_GATHER = 0x0102040810204080


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a boolean tensor into a flat ``uint8`` tensor, 8 elements a byte.

    Example:
        >>> m = torch.tensor([True, False, True, True, False, False, False, False, True])
        >>> packed = pack_bits(m)
        >>> packed.tolist(), torch.equal(unpack_bits(packed, m.shape), m)
        ([13, 1], True)
    """
    flat = mask.reshape(-1).view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.int64)
    return ((words * _GATHER) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[:, None] >> shifts) & 1
    numel = 1
    for size in shape:
        numel *= size
    return bits.reshape(-1)[:numel].view(torch.bool).reshape(shape)
