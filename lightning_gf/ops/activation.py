"""ReLU, ReLU6 and Dropout that keep a bit-packed mask for backward (exact gradients).

A plain ``nn.ReLU`` keeps its whole float output for backward; its gradient only
needs to know where the output is positive: 1 bit per element, 1/32 of float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gf.ops.bitpack import pack_bits, unpack_bits


class _MaskedIdentityBackward(torch.autograd.Function):
    """``out = f(x)`` computed by the caller; backward multiplies by a saved 0/1 (scaled) mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, mask: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape, ctx.scale = mask.shape, scale
        if out.data_ptr() == x.data_ptr():
            ctx.mark_dirty(x)
            return x
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (packed,) = ctx.saved_tensors
        mask = unpack_bits(packed, ctx.shape)
        grad_x = grad * mask if ctx.scale == 1.0 else grad * mask * ctx.scale
        return grad_x, None, None, None


def lean_relu(x: Tensor, inplace: bool = False, upper: float | None = None) -> Tensor:
    """ReLU (or ReLU6 with ``upper=6``) keeping a bit mask instead of its output.

    Example:
        >>> x = torch.tensor([-1.0, 2.0, 7.0], requires_grad=True)
        >>> lean_relu(x, upper=6.0).sum().backward()
        >>> x.grad.tolist()
        [0.0, 1.0, 0.0]
    """
    with torch.no_grad():
        if upper is None:
            out = torch.relu_(x) if inplace else torch.relu(x)
            mask = out > 0
        else:
            out = F.hardtanh(x, 0.0, upper, inplace=inplace)
            mask = (out > 0) & (out < upper)
    return _MaskedIdentityBackward.apply(x, out, mask, 1.0)


def lean_dropout(x: Tensor, p: float, inplace: bool = False) -> Tensor:
    """Training-mode dropout keeping its keep-mask as bits instead of bytes."""
    with torch.no_grad():
        keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)
        scale = 1.0 / (1.0 - p)
        out = x.mul_(keep).mul_(scale) if inplace else x * keep * scale
    return _MaskedIdentityBackward.apply(x, out, keep, scale)
