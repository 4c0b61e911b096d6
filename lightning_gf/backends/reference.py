"""The plain PyTorch backend: every step for every input (the last in the dispatcher's order).

Each step of the filtered conv's memory-bound work, written with PyTorch ops only:
pooling a map over the patch grid, the patch means and per-channel total of ``g_y``,
spreading ``g_x`` back over the input, summing a kernel's taps, broadcasting ``g_w``
over them. The other backends compute the same numbers faster where they take the input.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # the grid's geometry comes in from the ops
    from lightning_gf.ops.patch_grid import AxisGrid

NAME = "reference"
LOW_PRECISION = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise.

    Example:
        >>> accumulation_dtype(torch.float16)
        torch.float32
    """
    return torch.float32 if dtype in LOW_PRECISION else dtype


def pooled_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the patch sums of ``t``: float32 for half types on CPU (the products run
    in float32 there), the half type itself on GPUs (summed in float32, then rounded, so
    the products run on tensor cores, as a half-precision conv's own backward does).

    Example:
        >>> pooled_dtype(torch.ones(1, dtype=torch.bfloat16))
        torch.float32
    """
    if t.dtype in LOW_PRECISION and t.device.type != "cpu":
        return t.dtype
    return accumulation_dtype(t.dtype)


def _sum_tiles(t: Tensor, kh: int, kw: int) -> Tensor:
    """Sum over non-overlapping ``kh x kw`` tiles of a map they tile exactly.

    Two passes of strided adds (columns, then rows): faster on CPU than
    ``avg_pool2d`` or a 6-D reshape-sum for contiguous NCHW tensors.
    """
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return F.avg_pool2d(t, (kh, kw), (kh, kw), divisor_override=1)
    cols = t.reshape(n, c, h, w // kw, kw)
    acc = cols[..., 0] + cols[..., 1] if kw > 1 else cols[..., 0]
    for j in range(2, kw):
        acc += cols[..., j]
    rows = acc.reshape(n, c, h // kh, kh, w // kw)
    out = rows[:, :, :, 0] + rows[:, :, :, 1] if kh > 1 else rows[:, :, :, 0]
    for i in range(2, kh):
        out += rows[:, :, :, i]
    return out


def pool(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, on_input: bool) -> Tensor:
    """Patch sums of ``t`` over the grid's input (or output) patches, as :func:`pooled_dtype`:
    zero padding (or a crop) to the grid, then sums over its tiles."""
    size_h, before_h, after_h = grid_h.cells(on_input)
    size_w, before_w, after_w = grid_w.cells(on_input)
    pads = (before_w, after_w, before_h, after_h)
    target = pooled_dtype(t)
    t = t.to(accumulation_dtype(t.dtype))
    if any(pads):  # zero cells outside the map (or crop where the grid is smaller than it)
        t = F.pad(t, pads)
    return _sum_tiles(t, size_h, size_w).to(target)


@functools.lru_cache(maxsize=256)
def _patch_counts_cached(grid_h: AxisGrid, grid_w: AxisGrid, dtype: torch.dtype, device: torch.device) -> Tensor:
    counts_h = torch.tensor(grid_h.out_counts(), dtype=dtype, device=device)
    counts_w = torch.tensor(grid_w.out_counts(), dtype=dtype, device=device)
    return counts_h[:, None] * counts_w[None, :]


def patch_counts(grid_h: AxisGrid, grid_w: AxisGrid, like: Tensor) -> Tensor:
    """Number of output cells inside the map for each patch, ``(P_h, P_w)``."""
    if torch.compiler.is_compiling():
        return _patch_counts_cached.__wrapped__(grid_h, grid_w, like.dtype, like.device)
    return _patch_counts_cached(grid_h, grid_w, like.dtype, like.device)


def means_and_total(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> tuple[Tensor, Tensor]:
    """Means of ``grad_out`` over the valid cells of each output patch, and its per-channel sum."""
    sums = pool(grad_out, grid_h, grid_w, on_input=False)
    total = sums.sum((0, 2, 3))
    if grid_h.out_before == grid_h.out_after == grid_w.out_before == grid_w.out_after == 0:
        return sums / (grid_h.r * grid_w.r), total  # every patch is full
    return sums / patch_counts(grid_h, grid_w, sums), total


def _upsample_to_input(low: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> Tensor:
    """Repeat each patch value over its input patch, then crop to the input map.

    Columns first (a small tensor), then whole rows (long contiguous copies).
    """
    n, c, ph, pw = low.shape
    kh, kw = grid_h.in_patch, grid_w.in_patch
    cols = low[..., None].expand(n, c, ph, pw, kw).reshape(n, c, ph, pw * kw)
    full = cols[:, :, :, None, :].expand(n, c, ph, kh, pw * kw).reshape(n, c, ph * kh, pw * kw)
    if min(grid_h.in_before, grid_h.in_after, grid_w.in_before, grid_w.in_after) >= 0:
        # the grid covers the input: crop with a view (no copy; autograd takes strided grads)
        h_end = full.shape[2] - grid_h.in_after
        w_end = full.shape[3] - grid_w.in_after
        return full[:, :, grid_h.in_before : h_end, grid_w.in_before : w_end]
    pads = (-grid_w.in_before, -grid_w.in_after, -grid_h.in_before, -grid_h.in_after)
    return F.pad(full, pads)  # grid smaller than the input: crop and zero-fill


def spread(low: Tensor, height: int, width: int, grid_h: AxisGrid, grid_w: AxisGrid, scale: float,
           dtype: torch.dtype, channels_last: bool) -> Tensor:
    """``g_x``: ``scale`` times each patch value, repeated over its input patch, as ``dtype``."""
    if scale != 1:
        low = low * scale
    grad_x = _upsample_to_input(low, grid_h, grid_w).to(dtype)
    return grad_x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def tap_sums(w: Tensor) -> Tensor:
    """``w.sum((2, 3))``: one reduction on a GPU; on CPU a matrix-vector product, about 3x faster."""
    c_out, c_in_group, kh, kw = w.shape
    if w.device.type != "cpu":
        return w.sum((2, 3))
    return torch.mv(w.reshape(c_out * c_in_group, kh * kw), w.new_ones(kh * kw)).reshape(c_out, c_in_group)


def broadcast(per_pair: Tensor, weight_shape: torch.Size, scale: float, dtype: torch.dtype) -> Tensor:
    """``g_w``: ``scale`` times each (out, in) pair's value, over every tap, as ``dtype``."""
    if per_pair.device.type != "cpu":  # one broadcasting copy (and an in-place scale for strided convs)
        grad_w = torch.empty(weight_shape, dtype=dtype, device=per_pair.device)
        grad_w.copy_(per_pair[:, :, None, None].expand(weight_shape))
        return grad_w.mul_(scale) if scale != 1 else grad_w
    if scale != 1:
        per_pair = per_pair * scale
    return per_pair[:, :, None, None].expand(weight_shape).to(dtype).contiguous()


def declines(*args: object) -> Optional[str]:
    """The reference takes every input."""
    return None
