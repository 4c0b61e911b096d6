"""Eval-mode BatchNorm that keeps only a patch-pooled copy of its input for backward.

In eval mode BatchNorm is the per-channel affine map ``y = (x - mean) * gamma / std +
beta``. Its input gradient ``g * gamma / std`` and bias gradient ``sum(g)`` need no
activation (exact). The weight gradient ``sum(g * (x - mean) / std)`` needs the input;
here it is computed on the filter's patch grid, as the filtered conv does:
``sum_patches mean(g) * sum(x - mean) / std``, so only patch sums of ``x`` are kept
(``1/r^2`` of it). With a frozen ``gamma`` nothing at all is kept.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gf.ops.conv import (
    _NO_DOUBLE_BACKWARD,
    _patch_counts,
    _patch_means_and_total,
    pool_patches,
    pooled_dtype,
)
from lightning_gf.ops.once_differentiable import once_differentiable
from lightning_gf.ops.patch_grid import AxisGrid


def _grids(x_shape: Any, r: int) -> tuple[AxisGrid, AxisGrid]:
    h, w = x_shape[2], x_shape[3]
    # symbolic sizes (torch.compile with dynamic shapes) do not hash: no cache for them
    build = AxisGrid.build if type(h) is int and type(w) is int else AxisGrid.build.__wrapped__
    return build(h, h, r, 1), build(w, w, r, 1)


def _lean_forward(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  r: int, pool: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Eval-mode batch norm of ``x``, and the patch sums of ``x`` when ``pool`` (else None):
    the forward of both entry points, the custom op and the eager Function."""
    y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    return y, pool_patches(x, *_grids(x.shape, r), on_input=True) if pool else None


@torch.library.custom_op("lightning_gf::lean_batch_norm", mutates_args=())
def _lean_batch_norm_op(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, r: int,
    pool: bool,
) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm, and the patch sums of ``x`` when ``pool`` (else an empty tensor)."""
    y, pooled = _lean_forward(x, mean, var, weight, bias, eps, r, pool)
    # contiguous, as the fake kernel says: in a compiled graph this runs with the compiled CPU
    # kernels on, whose sums come channel-major (a copy of 1/r^2 of x, in compiled graphs only)
    return y, pooled.contiguous() if pooled is not None else x.new_empty(0)


@_lean_batch_norm_op.register_fake
def _(x, mean, var, weight, bias, eps, r, pool):  # type: ignore[no-untyped-def]
    grid_h, grid_w = _grids(x.shape, r)
    shape = (x.shape[0], x.shape[1], grid_h.patches, grid_w.patches) if pool else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=pooled_dtype(x) if pool else x.dtype)


@torch.library.custom_op("lightning_gf::lean_batch_norm_backward", mutates_args=())
def _lean_batch_norm_backward_op(
    grad: Tensor, pooled: Optional[Tensor], mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float, r: int,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_x, g_weight, g_bias)``; an empty tensor for each one not needed."""
    return _lean_backward(grad, pooled, mean, var, weight, eps, r, need_x, need_w, need_b)


def _lean_backward(
    grad: Tensor, pooled: Optional[Tensor], mean: Tensor, var: Tensor, weight: Optional[Tensor], eps: float, r: int,
    need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.promote_types(var.dtype, torch.float32)  # float32 for half statistics, float64 kept
    invstd = torch.rsqrt(var.to(acc) + eps)
    grad_x, grad_w, grad_b = (grad.new_empty(0) for _ in range(3))
    if need_x:
        scale = invstd if weight is None else weight.to(acc) * invstd
        grad_x = grad * scale.to(grad.dtype)[:, None, None]
    if need_w or need_b:
        grids = _grids(grad.shape, r)
        gbar, total = _patch_means_and_total(grad, *grids)
        counts = _patch_counts(*grids, gbar)
        param_dtype = mean.dtype if weight is None else weight.dtype
        if need_b:  # exact
            grad_b = total.to(param_dtype)
        if need_w:
            assert pooled is not None and weight is not None
            centred = pooled - counts * mean.to(acc)[:, None, None]
            grad_w = ((gbar * centred).sum((0, 2, 3)) * invstd).to(param_dtype)
    return grad_x, grad_w, grad_b


@_lean_batch_norm_backward_op.register_fake
def _(grad, pooled, mean, var, weight, eps, r, need_x, need_w, need_b):  # type: ignore[no-untyped-def]
    channels = (mean.shape[0],)
    return (
        torch.empty_like(grad) if need_x else grad.new_empty(0),
        mean.new_empty(channels if need_w else (0,)),
        mean.new_empty(channels if need_b else (0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, mean, var, weight, _, eps, r, pool = inputs
    ctx.save_for_backward(output[1] if pool else None, mean, var, weight)
    ctx.eps, ctx.r = eps, r


@once_differentiable(_NO_DOUBLE_BACKWARD)
def _backward(ctx: Any, grad: Tensor, _grad_pooled: Any) -> tuple[Any, ...]:
    pooled, mean, var, weight = ctx.saved_tensors
    need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
    grad_x, grad_w, grad_b = _lean_batch_norm_backward_op(
        grad, pooled, mean, var, weight, ctx.eps, ctx.r, need_x, need_w, need_b
    )
    return (grad_x if need_x else None, None, None, grad_w if need_w else None, grad_b if need_b else None,
            None, None, None)


_lean_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


class _LeanBatchNormFunction(torch.autograd.Function):
    """The custom op's forward and backward for eager mode (a tenth of its dispatch cost);
    ``torch.compile`` traces the custom op."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],  # type: ignore[override]
                bias: Optional[Tensor], eps: float, r: int, pool: bool) -> Tensor:
        y, pooled = _lean_forward(x, mean, var, weight, bias, eps, r, pool)
        ctx.save_for_backward(pooled, mean, var, weight)
        ctx.eps, ctx.r = eps, r
        return y

    @staticmethod
    @once_differentiable(_NO_DOUBLE_BACKWARD)
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        pooled, mean, var, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        grad_x, grad_w, grad_b = _lean_backward(grad, pooled, mean, var, weight, ctx.eps, ctx.r, need_x, need_w,
                                                need_b)
        return (grad_x if need_x else None, None, None, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None)


def lean_batch_norm(
    x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, r: int
) -> Tensor:
    """Eval-mode ``batch_norm`` (exact output) whose backward keeps only patch sums of ``x``.

    Example:
        >>> x = torch.randn(2, 3, 4, 4)
        >>> mean, var, w, b = torch.zeros(3), torch.ones(3), torch.ones(3, requires_grad=True), torch.zeros(3)
        >>> y = lean_batch_norm(x, mean, var, w, b, 1e-5, r=2)
        >>> torch.equal(y, F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5))
        True
    """
    pool = torch.is_grad_enabled() and weight is not None and weight.requires_grad
    if torch.compiler.is_compiling():
        return _lean_batch_norm_op(x, mean, var, weight, bias, eps, r, pool)[0]
    return _LeanBatchNormFunction.apply(x, mean, var, weight, bias, eps, r, pool)
