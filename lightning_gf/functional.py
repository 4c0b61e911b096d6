"""``filtered_conv2d``: a Conv2d with an exact forward and a gradient-filtered backward.

The forward is ``torch.nn.functional.conv2d`` itself. For backward it keeps only
the input summed over ``r*s x r*s`` patches (never the input itself), and computes
the gradients from the patch means of the output gradient (``shared/method.md``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gf.patch_grid import AxisGrid
from lightning_gf.stats import FilterStats

IntPair = Union[int, tuple[int, int]]
Padding = Union[str, int, tuple[int, int]]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def pool_patches(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, *, on_input: bool) -> Tensor:
    """Sum ``t`` over the patches of the grid (input patches, or output patches).

    Cells outside ``t`` count zero. Sums are taken in float32 for half types.

    Example:
        >>> g = AxisGrid.build(in_size=4, out_size=4, r=2, stride=1)
        >>> pool_patches(torch.ones(1, 1, 4, 4), g, g, on_input=True).flatten().tolist()
        [4.0, 4.0, 4.0, 4.0]
    """
    if on_input:
        size_h, size_w = grid_h.in_patch, grid_w.in_patch
        pads = (grid_w.in_before, grid_w.in_after, grid_h.in_before, grid_h.in_after)
    else:
        size_h, size_w = grid_h.r, grid_w.r
        pads = (grid_w.out_before, grid_w.out_after, grid_h.out_before, grid_h.out_after)
    t = t.to(_accumulation_dtype(t.dtype))
    if any(pads):
        t = F.pad(t, pads)
    n, c = t.shape[:2]
    return t.reshape(n, c, grid_h.patches, size_h, grid_w.patches, size_w).sum((3, 5))


def _patch_means(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> Tensor:
    sums = pool_patches(grad_out, grid_h, grid_w, on_input=False)
    counts_h = torch.tensor(grid_h.out_counts(), dtype=sums.dtype, device=sums.device)
    counts_w = torch.tensor(grid_w.out_counts(), dtype=sums.dtype, device=sums.device)
    return sums / (counts_h[:, None] * counts_w[None, :])


def _upsample_to_input(low: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> Tensor:
    """Repeat each patch value over its input patch, then crop to the input map."""
    n, c = low.shape[:2]
    full = low[:, :, :, None, :, None].expand(
        n, c, grid_h.patches, grid_h.in_patch, grid_w.patches, grid_w.in_patch
    )
    full = full.reshape(n, c, grid_h.patches * grid_h.in_patch, grid_w.patches * grid_w.in_patch)
    pads = (-grid_w.in_before, -grid_w.in_after, -grid_h.in_before, -grid_h.in_after)
    return F.pad(full, pads) if any(pads) else full


def _low_res_input_grad(
    gbar: Tensor, weight: Tensor, r: int, dilation: tuple[int, int], groups: int
) -> Tensor:
    """``glow``: the input gradient on the patch grid.

    Along an axis whose dilation is below ``r`` the kernel taps collapse into their
    sum (a 1x1 transposed conv); along an axis with ``dilation >= r`` (atrous) the
    taps keep their shape and sample the low-resolution map at dilation ``d // r``.
    """
    w = weight.to(gbar.dtype)
    kept_dilation, crop = [], []
    for axis, d in enumerate(dilation):
        k = weight.shape[2 + axis]
        if d >= r:
            kept_dilation.append(d // r)
            crop.append((d // r) * (k // 2))
        else:
            w = w.sum(2 + axis, keepdim=True)
            kept_dilation.append(1)
            crop.append(0)
    low = F.conv_transpose2d(gbar, w, groups=groups, dilation=tuple(kept_dilation))
    ph, pw = gbar.shape[2:]
    return low[:, :, crop[0] : crop[0] + ph, crop[1] : crop[1] + pw]


def _weight_grad(gbar: Tensor, xs: Tensor, weight_shape: torch.Size, groups: int) -> Tensor:
    """One value per (out, in) channel pair, shared by every kernel tap."""
    n, c_out = gbar.shape[:2]
    c_in = xs.shape[1]
    g_bar = gbar.reshape(n, groups, c_out // groups, -1)
    x_s = xs.reshape(n, groups, c_in // groups, -1)
    per_pair = torch.einsum("ngop,ngcp->goc", g_bar, x_s).reshape(c_out, c_in // groups, 1, 1)
    return per_pair.expand(weight_shape)


def _call_stats(
    x: Tensor,
    weight: Tensor,
    y: Tensor,
    xs: Optional[Tensor],
    grid_h: AxisGrid,
    grid_w: AxisGrid,
    dilation: tuple[int, int],
    r: int,
    needs_grad: tuple[bool, ...],
) -> FilterStats:
    """What one filtered call keeps, what a plain conv would keep, and the backward work."""
    need_x, need_w = needs_grad[0], needs_grad[1]
    c_out, c_in_group, kh, kw = weight.shape
    pairs = x.shape[0] * c_out * c_in_group
    taps = kh * kw
    patches = grid_h.patches * grid_w.patches
    atrous_taps = (kh if dilation[0] >= r else 1) * (kw if dilation[1] >= r else 1)
    vanilla_macs = pairs * taps * y.shape[2] * y.shape[3] * (int(need_x) + int(need_w))
    filtered_macs = pairs * patches * (atrous_taps * int(need_x) + int(need_w))
    return FilterStats(
        kept_bytes=0 if xs is None else xs.numel() * xs.element_size(),
        vanilla_bytes=x.numel() * x.element_size() if need_w else 0,
        backward_macs_vanilla=vanilla_macs,
        backward_macs_filtered=filtered_macs,
    )


def _plain_call_stats(x: Tensor, weight: Tensor, y: Tensor) -> FilterStats:
    """``r = 1`` (plain backprop): the conv keeps its input when its weight trains."""
    kept = x.numel() * x.element_size() if weight.requires_grad else 0
    taps = weight.shape[2] * weight.shape[3]
    macs = x.shape[0] * weight.shape[0] * weight.shape[1] * taps * y.shape[2] * y.shape[3]
    macs *= int(x.requires_grad) + int(weight.requires_grad)
    return FilterStats(kept_bytes=kept, vanilla_bytes=kept, backward_macs_vanilla=macs, backward_macs_filtered=macs)


class _FilteredConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        stride: tuple[int, int],
        padding: Padding,
        dilation: tuple[int, int],
        groups: int,
        r: int,
        stride_correction: bool,
        stats: Optional[FilterStats],
    ) -> Tensor:
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        grid_h = AxisGrid.build(x.shape[2], y.shape[2], r, stride[0])
        grid_w = AxisGrid.build(x.shape[3], y.shape[3], r, stride[1])
        weight_needs_grad = ctx.needs_input_grad[1]
        xs = pool_patches(x, grid_h, grid_w, on_input=True) if weight_needs_grad else None
        ctx.save_for_backward(xs, weight)
        ctx.grids = (grid_h, grid_w)
        ctx.conf = (dilation, groups, r, stride[0] * stride[1] if stride_correction else 1)
        ctx.x_meta = (x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        if stats is not None:
            stats.add(_call_stats(x, weight, y, xs, grid_h, grid_w, dilation, r, ctx.needs_input_grad))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        xs, weight = ctx.saved_tensors
        grid_h, grid_w = ctx.grids
        dilation, groups, r, stride_scale = ctx.conf
        x_dtype, channels_last = ctx.x_meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gbar = _patch_means(grad_out, grid_h, grid_w)
        grad_x = grad_w = grad_b = None
        if need_x:
            low = _low_res_input_grad(gbar, weight, r, dilation, groups)
            if stride_scale != 1:
                low = low / stride_scale
            grad_x = _upsample_to_input(low, grid_h, grid_w).to(x_dtype)
            if channels_last:
                grad_x = grad_x.contiguous(memory_format=torch.channels_last)
        if need_w:
            grad_w = _weight_grad(gbar, xs, weight.shape, groups)
            if stride_scale != 1:
                grad_w = grad_w / stride_scale
            grad_w = grad_w.to(weight.dtype).contiguous()
        if need_b:
            grad_b = grad_out.sum((0, 2, 3), dtype=_accumulation_dtype(grad_out.dtype)).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def filtered_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    r: int = 2,
    stride_correction: bool = True,
    _stats: Optional[FilterStats] = None,
) -> Tensor:
    """2-D convolution with an exact forward and a gradient-filtered backward.

    Arguments are those of :func:`torch.nn.functional.conv2d`, plus:

    Args:
        r: patch size of the filter on the output map; ``r=1`` is plain backprop.
        stride_correction: divide the filtered gradients of strided convs by
            ``stride_h * stride_w`` (``False`` reproduces the paper's convention).

    Returns:
        Exactly what ``torch.nn.functional.conv2d`` returns.

    Example:
        >>> x = torch.randn(2, 3, 8, 8, requires_grad=True)
        >>> w = torch.randn(4, 3, 3, 3, requires_grad=True)
        >>> y = filtered_conv2d(x, w, padding=1, r=2)
        >>> torch.equal(y, torch.nn.functional.conv2d(x, w, padding=1))
        True
        >>> y.sum().backward()
        >>> bool((w.grad == w.grad[:, :, :1, :1]).all())  # one value per channel pair
        True
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    if input.dim() != 4:
        raise ValueError(f"filtered_conv2d takes a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
    stride_pair = _pair(stride, "stride")
    dilation_pair = _pair(dilation, "dilation")
    if r == 1:
        out = F.conv2d(input, weight, bias, stride_pair, padding, dilation_pair, groups)
        if _stats is not None and torch.is_grad_enabled():
            _stats.add(_plain_call_stats(input, weight, out))
        return out
    return _FilteredConv2dFunction.apply(
        input, weight, bias, stride_pair, padding, dilation_pair, groups, r, stride_correction, _stats
    )
