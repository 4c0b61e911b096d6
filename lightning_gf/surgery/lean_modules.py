"""The behaviours a module of the trained region takes on when ``lean=True``: BatchNorm2d in
eval mode runs :func:`lightning_gf.ops.batchnorm.lean_batch_norm` (patch sums kept), ReLU,
ReLU6 and Dropout keep bit-packed masks (:mod:`lightning_gf.ops.activation`). See
``docs/memory.md`` for what stays exact."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_gf.ops.activation import lean_dropout, lean_relu
from lightning_gf.ops.batchnorm import lean_batch_norm
from lightning_gf.surgery.class_swap import Swappable
from lightning_gf.surgery.frozen_batchnorm import EvalModeMixin


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


def _wants_lean(module: Any, x: Tensor) -> bool:
    # Under torch.compile the plain module runs: the compiler plans that memory itself.
    return module.gf_r > 1 and torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()


class LeanReLUMixin(Swappable):
    """Mixed into an ``nn.ReLU``: same output, a bit mask kept for backward.

    ``gf_r == 1`` (see :meth:`GradientFilterHandle.plain`) runs the plain module.
    """

    gf_r: int

    def forward(self, input: Tensor) -> Tensor:
        if not _wants_lean(self, input):
            return super().forward(input)  # type: ignore[misc]
        return lean_relu(input, self.inplace)  # type: ignore[attr-defined]


class LeanReLU6Mixin(Swappable):
    """Mixed into an ``nn.ReLU6``: same output, a bit mask kept for backward."""

    gf_r: int

    def forward(self, input: Tensor) -> Tensor:
        if not _wants_lean(self, input):
            return super().forward(input)  # type: ignore[misc]
        return lean_relu(input, self.inplace, upper=6.0)  # type: ignore[attr-defined]


class LeanDropoutMixin(Swappable):
    """Mixed into an ``nn.Dropout``: in training, the keep-mask is kept as bits."""

    gf_r: int

    def forward(self, input: Tensor) -> Tensor:
        p = self.p  # type: ignore[attr-defined]
        if not (self.training and 0.0 < p < 1.0 and _wants_lean(self, input)):  # type: ignore[attr-defined]
            return super().forward(input)  # type: ignore[misc]
        return lean_dropout(input, p, self.inplace)  # type: ignore[attr-defined]
