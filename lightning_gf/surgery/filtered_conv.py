"""The behaviour a patched ``nn.Conv2d`` takes on: its forward uses ``filtered_conv2d``."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gf.ops.conv import filtered_conv2d
from lightning_gf.ops.stats import FilterStats
from lightning_gf.surgery.class_swap import Swappable


class FilteredConvMixin(Swappable):
    """Mixed into an ``nn.Conv2d`` instance by :func:`lightning_gf.apply_gradient_filter`.

    The layer keeps its parameters, buffers and ``state_dict`` keys; only the
    backward of its conv changes. Without grad (eval, ``torch.no_grad``) or when
    nothing upstream needs a gradient, it runs the plain conv.

    Attributes:
        gf_r: patch size of the filter.
        gf_stride_correction: see :func:`lightning_gf.ops.conv.filtered_conv2d`.
        gf_stats: what the layer kept and saved since the stats were last reset.
    """

    gf_r: int
    gf_stride_correction: bool
    gf_stats: FilterStats

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        needs_grad = input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        if not (torch.is_grad_enabled() and needs_grad):
            return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return filtered_conv2d(
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            r=self.gf_r,
            stride_correction=self.gf_stride_correction,
            _stats=self.gf_stats,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gradient_filter_r={self.gf_r}"  # type: ignore[misc]


def unsupported_reason(conv: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` cannot be filtered correctly, or ``None`` when it can."""
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    cls = type(conv)
    if cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward:
        return f"{cls.__qualname__} overrides forward"
    return None
