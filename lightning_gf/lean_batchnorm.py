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
from torch import Tensor, nn

from lightning_gf.class_swap import Swappable
from lightning_gf.frozen_batchnorm import EvalModeMixin
from lightning_gf.functional import _patch_counts, _patch_means, pool_patches
from lightning_gf.patch_grid import AxisGrid


class _LeanBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
        eps: float, r: int,
    ) -> Tensor:
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        grids = (AxisGrid.build(x.shape[2], x.shape[2], r, 1), AxisGrid.build(x.shape[3], x.shape[3], r, 1))
        pooled = pool_patches(x, *grids, on_input=True) if ctx.needs_input_grad[3] else None
        ctx.save_for_backward(pooled, mean, var, weight)
        ctx.grids, ctx.eps = grids, eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        pooled, mean, var, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        invstd = torch.rsqrt(var.float() + ctx.eps)
        grad_x = grad_w = grad_b = None
        if need_x:
            scale = invstd if weight is None else weight.float() * invstd
            grad_x = grad * scale.to(grad.dtype)[:, None, None]
        if need_w or need_b:
            gbar = _patch_means(grad, *ctx.grids)
            counts = _patch_counts(*ctx.grids, gbar)
            if need_b:
                grad_b = (gbar * counts).sum((0, 2, 3)).to(grad.dtype)
            if need_w:
                centred = pooled - counts * mean.float()[:, None, None]
                grad_w = ((gbar * centred).sum((0, 2, 3)) * invstd).to(weight.dtype)
        return grad_x, None, None, grad_w, grad_b, None, None


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
    return _LeanBatchNormFunction.apply(x, mean, var, weight, bias, eps, r)


def _is_timm_batchnorm_act(cls: type) -> bool:
    """Whether ``cls`` runs timm's ``BatchNormAct2d.forward`` (batch norm, then drop, then act)."""
    try:
        from timm.layers.norm_act import BatchNormAct2d
    except ImportError:  # pragma: no cover - timm is optional
        return False
    return cls.forward is BatchNormAct2d.forward


def lean_batchnorm_supported(module: nn.Module) -> bool:
    """A plain ``nn.BatchNorm2d`` or timm's ``BatchNormAct2d``, with running statistics."""
    if not isinstance(module, nn.BatchNorm2d) or module.running_mean is None:
        return False
    return type(module).forward is nn.BatchNorm2d.forward or _is_timm_batchnorm_act(type(module))


class LeanBatchNormMixin(Swappable):
    """Mixed into a BatchNorm2d: in eval mode with grad, it runs :func:`lean_batch_norm`."""

    gf_r: int

    def forward(self, input: Tensor) -> Tensor:
        bn: Any = self
        if bn.training or self.gf_r == 1 or not torch.is_grad_enabled() or input.dim() != 4:
            return super().forward(input)  # type: ignore[misc]
        out = lean_batch_norm(input, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, self.gf_r)
        if _is_timm_batchnorm_act(self._gf_base_class):
            out = bn.act(bn.drop(out))
        return out


class LeanEvalBatchNormMixin(EvalModeMixin, LeanBatchNormMixin):
    """Both: kept in eval mode, and lean."""
