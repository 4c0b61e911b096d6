"""``torch.library.opcheck`` on every Python custom op: schema, autograd registration, fake
kernels (shapes and strides as the real ones) and AOT dispatch with dynamic shapes.

The compiled CPU kernels' ops (``lightning_gf_cpu::*``) have no fake kernels yet: under
``torch.compile`` the op runs its plain PyTorch math instead (docs/architecture.md).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from lightning_gf.ops import batchnorm, conv

F64 = dict(dtype=torch.float64)
CASES = [  # (x shape, weight shape, stride, padding, dilation, groups, r, channels_last)
    ((2, 3, 7, 7), (4, 3, 3, 3), 1, 1, 1, 1, 2, False),
    ((2, 4, 9, 8), (4, 1, 3, 3), 2, 1, 1, 4, 2, False),  # depthwise, strided, odd
    ((1, 3, 10, 10), (2, 3, 3, 3), 1, 4, 4, 1, 2, False),  # atrous: dilation >= r
    ((2, 3, 8, 8), (4, 3, 1, 1), 1, 0, 1, 1, 4, True),  # channels_last
]


def _inputs(case):
    x_shape, w_shape, stride, padding, dilation, groups, r, channels_last = case
    torch.manual_seed(0)
    x = torch.randn(x_shape, **F64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(w_shape, **F64), torch.randn(w_shape[0], **F64)
    geometry = conv._geometry(x, w, stride, padding, dilation, r, False)
    pooled = conv.pool_patches(x, geometry.grid_h, geometry.grid_w, on_input=True)
    return x, w, b, pooled, geometry


@pytest.mark.parametrize("case", CASES)
def test_filtered_conv2d_op(case):
    x, w, b, pooled, g = _inputs(case)
    groups, r = case[5], case[6]
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), pooled, list(g.stride), list(g.padding),
            g.padding_str, list(g.dilation), groups, r, True)
    opcheck(conv._filtered_conv2d_op, args)


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
@pytest.mark.parametrize("case", CASES)
def test_filtered_conv2d_backward_op(case, needs):
    x, w, b, pooled, g = _inputs(case)
    groups, r, channels_last = case[5], case[6], case[7]
    gy = torch.randn(x.shape[0], w.shape[0], *g.out_size, **F64)
    scale = g.stride[0] * g.stride[1]
    args = (gy, pooled, w, list(x.shape), torch.float64, channels_last, list(g.stride), list(g.dilation), groups, r,
            scale, *needs)
    opcheck(conv._filtered_conv2d_backward_op, args)


@pytest.mark.parametrize("size,r", [((8, 8), 2), ((7, 9), 2), ((10, 11), 3)])
def test_lean_batch_norm_ops(size, r):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, **F64)
    mean, var = torch.randn(3, **F64), torch.rand(3, **F64) + 0.5
    weight, bias = torch.randn(3, **F64), torch.randn(3, **F64)
    opcheck(batchnorm._lean_batch_norm_op,
            (x.clone().requires_grad_(), mean, var, weight.clone().requires_grad_(), bias.clone().requires_grad_(),
             1e-5, r, True))
    pooled = conv.pool_patches(x, *batchnorm._grids(x.shape, r), on_input=True)
    g = torch.randn_like(x)
    opcheck(batchnorm._lean_batch_norm_backward_op, (g, pooled, mean, var, weight, 1e-5, r, True, True, True))
