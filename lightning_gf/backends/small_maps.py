"""Pooling and spreading small maps by one matrix product with a 0/1 cell-to-patch matrix.

Where the compiled CPU kernels are not in use (the plain PyTorch path, and while
``torch.compile`` traces), a map of at most ``SMALL_MAP`` cells cut into at most
``FEW_PATCHES`` patches (the 7x7 and 14x14 maps of the last stages of most CNNs) is
pooled by ``(N*C, H*W) @ (H*W, P)`` (or its transpose) and spread back by
``(N*C, P) @ (P, H*W)``: one call however irregular the grid, which was faster on CPU
than per-map loops in PyTorch (``docs/benchmarks-history.md``, attempt 4). The compiled
kernels pool such maps in registers instead (attempt 6).
With fewer than ``FEW_PATCHES`` patches, pooled maps come back *patch-major*: an
``(N, C, P_h, P_w)`` view of storage ordered ``(P_h, P_w, N, C)``, which the backward's
two channel products read as a ``(P*N, C)`` matrix without a copy
(:func:`is_patch_major`); with 16, the product into ``(N*C, P)`` rows was faster.
A non-finite value then reaches the other patches of its map as NaN (``0 * inf``),
where it would stay in its own patch otherwise; the gradient is unusable either way.

Example:
    >>> from lightning_gf.ops.patch_grid import AxisGrid
    >>> g = AxisGrid.build(in_size=3, out_size=3, r=2, stride=1)
    >>> pool_small(torch.ones(1, 1, 3, 3), g, g, on_input=True).flatten().tolist()
    [1.0, 2.0, 2.0, 4.0]
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lightning_gf import config
from lightning_gf.backends.reference import accumulation_dtype, pooled_dtype

if TYPE_CHECKING:  # the grid's geometry comes in from the ops; backends import nothing of them
    from lightning_gf.ops.patch_grid import AxisGrid

SMALL_MAP = 1024
FEW_PATCHES = 16


def _forced() -> bool:
    """Whether ``force_backend("small_maps")`` pins this path: every map takes it, patch-major."""
    return config._FORCED == "small_maps"


def is_small(h: int, w: int, grid_h: AxisGrid, grid_w: AxisGrid) -> bool:
    """Whether an ``h x w`` map on this grid takes the matrix-product path: a small map in
    the default order, every map where this backend is forced, none where another one is."""
    forced = config._FORCED
    if forced is not None:
        return forced == "small_maps"
    return h * w <= SMALL_MAP and grid_h.patches * grid_w.patches <= FEW_PATCHES


@functools.lru_cache(maxsize=256)
def _membership_cached(grid_h: AxisGrid, grid_w: AxisGrid, on_input: Optional[bool], dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    def axis(grid: AxisGrid) -> Tensor:
        cells = torch.tensor(grid.cell_patches(bool(on_input)))
        return (cells[:, None] == torch.arange(grid.patches)[None, :]).to(torch.float64)

    member = torch.kron(axis(grid_h), axis(grid_w))  # (H*W, P_h*P_w)
    if on_input is None:  # output means, then a column of ones for the map's total
        member = torch.cat([member / member.sum(0).clamp_min(1), member.new_ones(member.shape[0], 1)], 1)
    return member.to(dtype=dtype, device=device)


def _membership(grid_h: AxisGrid, grid_w: AxisGrid, on_input: Optional[bool], like: Tensor) -> Tensor:
    """``(H*W, P)``: 1 where a cell of the map lies in a patch. ``on_input=None``: output
    patches, each column divided by its cell count, and a last column of ones."""
    if torch.compiler.is_compiling():
        return _membership_cached.__wrapped__(grid_h, grid_w, on_input, like.dtype, like.device)
    return _membership_cached(grid_h, grid_w, on_input, like.dtype, like.device)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in the inputs' own dtype, also under autocast (which would cast it to half).

    With few columns it is computed as ``(b.T @ a.T).T``: MKL's product with 4-8 output
    columns was 5x slower than the transposed one (measured on CPU)."""
    if torch.is_autocast_enabled(a.device.type):
        with torch.autocast(a.device.type, enabled=False):
            return _product(a, b)
    if b.shape[1] < FEW_PATCHES or _forced():
        return (b.t() @ a.t()).t()
    return a @ b


def is_patch_major(t: Tensor) -> bool:
    """Whether ``t`` (N, C, P_h, P_w) is stored as (P_h, P_w, N, C): a ``(P*N, C)`` matrix for free.

    Example:
        >>> from lightning_gf.ops.patch_grid import AxisGrid
        >>> g = AxisGrid.build(in_size=4, out_size=4, r=2, stride=1)
        >>> is_patch_major(pool_small(torch.ones(2, 3, 4, 4), g, g, on_input=True))
        True
    """
    return t.permute(2, 3, 0, 1).is_contiguous()


def _patch_columns(out: Tensor, n: int, c: int, grid_h: AxisGrid, grid_w: AxisGrid) -> Tensor:
    """The first ``P`` columns of an ``(N*C, >= P)`` product from :func:`_product`, as an
    ``(N, C, P_h, P_w)`` view: of its rows, or patch-major where it came back transposed."""
    patches = grid_h.patches * grid_w.patches
    if out.is_contiguous():
        return out[:, :patches].reshape(n, c, grid_h.patches, grid_w.patches)
    return out.t()[:patches].view(grid_h.patches, grid_w.patches, n, c).permute(2, 3, 0, 1)


def pool_small(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, *, on_input: bool) -> Tensor:
    """Patch sums of ``t`` (N, C, H, W), in ``t``'s dtype, shape ``(N, C, P_h, P_w)``:
    patch-major below ``FEW_PATCHES`` patches, else rows (whichever product is faster)."""
    n, c, h, w = t.shape
    member = _membership(grid_h, grid_w, on_input, t)
    return _patch_columns(_product(t.reshape(n * c, h * w), member), n, c, grid_h, grid_w)


def means_and_total_small(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> tuple[Tensor, Tensor]:
    """Means over the valid cells of each output patch (laid out as :func:`pool_small`'s
    sums, by column count), and the per-channel sum, in one product."""
    n, c, h, w = grad_out.shape
    out = _product(grad_out.reshape(n * c, h * w), _membership(grid_h, grid_w, None, grad_out))
    return _patch_columns(out, n, c, grid_h, grid_w), out[:, -1].reshape(n, c).sum(0)


def spread_small(low: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, scale: float, height: int, width: int) -> Tensor:
    """``scale`` times each patch value of ``low`` repeated over its input patch, ``(N, C, height, width)``."""
    n, c = low.shape[:2]
    member = _membership(grid_h, grid_w, True, low)
    if scale != 1:
        member = member * scale
    if is_patch_major(low):  # (N*C, P) as the transpose of a (P, N*C) matrix, no copy
        values = low.permute(2, 3, 0, 1).reshape(-1, n * c).t()
    else:
        values = low.reshape(n * c, -1)
    return _product(values, member.t()).reshape(n, c, height, width)


# --- the steps of the filtered conv on this backend (see docs/architecture.md) -----------

NAME = "small_maps"


def _too_large() -> str:
    return f"more than {SMALL_MAP} cells or {FEW_PATCHES} patches"


def declines_pool(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> Optional[str]:
    """Why pooling ``t`` does not take the matrix product (None: it does)."""
    if not is_small(t.shape[2], t.shape[3], grid_h, grid_w):
        return _too_large()
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return "a channels_last map"
    return None


def declines_means(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> Optional[str]:
    """Why the means of ``grad_out`` do not take the matrix product (None: they do)."""
    if not is_small(grad_out.shape[2], grad_out.shape[3], grid_h, grid_w):
        return _too_large()
    if not grad_out.is_contiguous():
        return "a g_y that is not contiguous NCHW"
    return None


def declines_spread(low: Tensor, height: int, width: int, grid_h: AxisGrid, grid_w: AxisGrid,
                    channels_last: bool) -> Optional[str]:
    """Why spreading ``g_x`` does not take the matrix product (None: it does)."""
    if channels_last:
        return "a channels_last g_x"
    if not is_small(height, width, grid_h, grid_w):
        return _too_large()
    return None


def pool(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, on_input: bool) -> Tensor:
    """Patch sums in one product, summed in float32 for half types, as ``pooled_dtype``."""
    return pool_small(t.to(accumulation_dtype(t.dtype)), grid_h, grid_w, on_input=on_input).to(pooled_dtype(t))


def means_and_total(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> tuple[Tensor, Tensor]:
    """The patch means and per-channel total of ``grad_out`` in one product."""
    return means_and_total_small(grad_out.to(accumulation_dtype(grad_out.dtype)), grid_h, grid_w)


def spread(low: Tensor, height: int, width: int, grid_h: AxisGrid, grid_w: AxisGrid, scale: float,
           dtype: torch.dtype, channels_last: bool) -> Tensor:
    """``g_x`` in one product, NCHW."""
    return spread_small(low, grid_h, grid_w, scale, height, width).to(dtype).contiguous()
