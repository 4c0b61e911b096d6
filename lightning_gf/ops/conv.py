"""``filtered_conv2d``: a Conv2d with an exact forward and a gradient-filtered backward.

The forward is ``torch.nn.functional.conv2d`` itself. For backward it keeps only
the input summed over ``r*s x r*s`` patches (never the input itself), and computes
the gradients from the patch means of the output gradient (``shared/method.md``).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gf import config
from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.backends import dispatch, reference, small_maps
from lightning_gf.ops.once_differentiable import once_differentiable
from lightning_gf.ops.patch_grid import AxisGrid
from lightning_gf.ops.stats import FilterStats

IntPair = Union[int, tuple[int, int]]
Padding = Union[str, int, tuple[int, int]]

_LOG = logging.getLogger(__name__)
# From this many patches per map on, per-sample matrix products beat one product over
# transposed copies of NCHW maps (measured on CPU; both are exact). Channel-major maps
# (what the compiled kernels make) always take the single product, without copies.
_MANY_PATCHES = 100


_NO_DOUBLE_BACKWARD = (
    "lightning_gf: a filtered conv has no double backward (its backward is an approximation, computed once), "
    "so a second-order gradient (create_graph=True, e.g. a gradient penalty or MAML) cannot pass through it. "
    "Leave that layer unfiltered (exclude=[...] or r=1 for it) or remove the filter for that computation."
)


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def _pair_or_zero(value: IntPair) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise ValueError(f"padding must be 'same', 'valid', a non-negative int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


pooled_dtype = reference.pooled_dtype
_KERNEL_DTYPES = cpu_kernels.DTYPES
_channel_major = cpu_kernels.channel_major


def _use_kernels(t: Tensor) -> bool:
    """Whether the compiled CPU kernels take ``t`` (see :func:`lightning_gf.backends.cpu.declines`)."""
    return cpu_kernels.declines(t) is None


def pool_patches(t: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, *, on_input: bool) -> Tensor:
    """Sum ``t`` over the patches of the grid (input patches, or output patches).

    Cells outside ``t`` count zero. Sums are taken in float32 for half types and kept as
    :func:`pooled_dtype`. The first backend that takes ``t`` runs it
    (:mod:`lightning_gf.backends.dispatch`).

    Example:
        >>> g = AxisGrid.build(in_size=4, out_size=4, r=2, stride=1)
        >>> pool_patches(torch.ones(1, 1, 4, 4), g, g, on_input=True).flatten().tolist()
        [4.0, 4.0, 4.0, 4.0]
    """
    # no gradient flows through patch sums: nothing here may enter the autograd graph
    return dispatch.pool(t.detach(), grid_h, grid_w, on_input)


_patch_counts = reference.patch_counts


def _patch_means_and_total(grad_out: Tensor, grid_h: AxisGrid, grid_w: AxisGrid) -> tuple[Tensor, Tensor]:
    """Means of ``grad_out`` over the valid cells of each output patch, and its per-channel
    sum (the exact bias gradient), in one pass."""
    return dispatch.means_and_total(grad_out, grid_h, grid_w)


def _spread_to_input(low: Tensor, grid_h: AxisGrid, grid_w: AxisGrid, scale: float, dtype: torch.dtype,
                     channels_last: bool) -> Tensor:
    """``g_x``: ``scale`` times each patch value, repeated over its input patch, as ``dtype``."""
    height = grid_h.patches * grid_h.in_patch - grid_h.in_before - grid_h.in_after
    width = grid_w.patches * grid_w.in_patch - grid_w.in_before - grid_w.in_after
    return dispatch.spread(low, height, width, grid_h, grid_w, scale, dtype, channels_last)


def _tap_sums(w: Tensor) -> Tensor:
    """``w.sum((2, 3))`` (a view for 1x1 kernels)."""
    c_out, c_in_group, kh, kw = w.shape
    if kh * kw == 1:
        return w.reshape(c_out, c_in_group)
    return dispatch.tap_sums(w)


def _low_res_input_grad(
    gbar: Tensor, weight: Tensor, r: int, dilation: tuple[int, int], groups: int
) -> Tensor:
    """``glow``: the input gradient on the patch grid.

    Along an axis whose dilation is below ``r`` the kernel taps collapse into their
    sum (a 1x1 transposed conv); along an axis with ``dilation >= r`` (atrous) the
    taps keep their shape and sample the low-resolution map at dilation ``d // r``.
    """
    w = weight.to(gbar.dtype)
    if dilation[0] < r and dilation[1] < r:
        taps = _tap_sums(w)
        return _grouped_channel_mix(gbar, taps, groups, transpose=True)
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


def _grouped_channel_mix(t: Tensor, w2d: Tensor, groups: int, *, transpose: bool) -> Tensor:
    """A grouped 1x1 conv of ``t`` with the ``(C_out, C_in/groups)`` matrix ``w2d``.

    ``transpose=False`` maps input channels to output channels, ``True`` the reverse.
    Depthwise and depth-multiplier layers take elementwise paths instead of tiny
    matrix products.
    """
    c_out, c_in_group = w2d.shape
    c_out_group = c_out // groups
    n, _, ph, pw = t.shape
    if groups == 1:
        if small_maps.is_patch_major(t):  # (P*N, C) @ (C, C'), no copies; the result is patch-major too
            flat = t.permute(2, 3, 0, 1).reshape(-1, t.shape[1]) @ (w2d if transpose else w2d.t())
            return flat.view(ph, pw, n, -1).permute(2, 3, 0, 1)
        mix = w2d.t() if transpose else w2d
        if _channel_major(t):  # one product, no copies; the result is channel-major too
            return (mix @ t.transpose(0, 1).reshape(t.shape[1], -1)).reshape(-1, n, ph, pw).transpose(0, 1)
        if ph * pw >= _MANY_PATCHES:  # a product per sample, no transposed copies
            return torch.matmul(mix, t.reshape(n, t.shape[1], ph * pw)).reshape(n, -1, ph, pw)
        flat = t.transpose(0, 1).reshape(t.shape[1], n * ph * pw)  # few patches: one product for all
        return (mix @ flat).reshape(-1, n, ph, pw).transpose(0, 1)
    if c_in_group == 1 and transpose:  # depthwise / depth multiplier: C_out = m * C_in
        if c_out_group == 1:  # depthwise: one scale per channel
            return t * w2d.reshape(1, groups, 1, 1)
        return (t.reshape(n, groups, c_out_group, ph, pw) * w2d.reshape(1, groups, c_out_group, 1, 1)).sum(2)
    w3d = w2d.reshape(groups, c_out_group, c_in_group)
    if transpose:
        out = torch.einsum("goc,ngohw->ngchw", w3d, t.reshape(n, groups, c_out_group, ph, pw))
    else:
        out = torch.einsum("goc,ngchw->ngohw", w3d, t.reshape(n, groups, c_in_group, ph, pw))
    return out.reshape(n, -1, ph, pw)


def _weight_grad(gbar: Tensor, xs: Tensor, weight_shape: torch.Size, groups: int, scale: float,
                 dtype: torch.dtype) -> Tensor:
    """``g_w``: ``scale`` times one value per (out, in) channel pair, shared by every kernel tap."""
    per_pair = _weight_grad_per_pair(gbar, xs, groups)
    return dispatch.broadcast(per_pair, weight_shape, scale, dtype)


def _weight_grad_per_pair(gbar: Tensor, xs: Tensor, groups: int) -> Tensor:
    """``(C_out, C_in/groups)``: the product of the patch means of ``g_y`` and the patch sums of ``x``."""
    n, c_out = gbar.shape[:2]
    c_in = xs.shape[1]
    if gbar.dtype != xs.dtype:  # e.g. autocast: half g_y, float32 input sums
        common = torch.promote_types(gbar.dtype, xs.dtype)
        gbar, xs = gbar.to(common), xs.to(common)
    c_in_group, c_out_group = c_in // groups, c_out // groups
    if groups == 1:
        if _channel_major(gbar) and _channel_major(xs):  # one product over all samples and patches, no copies
            per_pair = gbar.transpose(0, 1).reshape(c_out, -1) @ xs.transpose(0, 1).reshape(c_in, -1).t()
        elif small_maps.is_patch_major(gbar) and small_maps.is_patch_major(xs):  # the same, patch-major
            per_pair = gbar.permute(2, 3, 0, 1).reshape(-1, c_out).t() @ xs.permute(2, 3, 0, 1).reshape(-1, c_in)
        elif gbar.shape[2] * gbar.shape[3] >= _MANY_PATCHES:  # a product per sample, summed
            per_pair = torch.bmm(gbar.reshape(n, c_out, -1), xs.reshape(n, c_in, -1).transpose(1, 2)).sum(0)
        else:  # few patches: one product over all samples and patches
            per_pair = gbar.transpose(0, 1).reshape(c_out, -1) @ xs.transpose(0, 1).reshape(c_in, -1).t()
    elif c_in_group == 1:  # depthwise / depth multiplier
        g = gbar.reshape(n, groups, c_out_group, -1)
        per_pair = (g * xs.reshape(n, groups, 1, -1)).sum((0, 3)).reshape(c_out, 1)
    else:
        g_bar = gbar.reshape(n, groups, c_out_group, -1)
        x_s = xs.reshape(n, groups, c_in_group, -1)
        per_pair = torch.einsum("ngop,ngcp->goc", g_bar, x_s).reshape(c_out, c_in_group)
    return per_pair


class _Reads:
    """What filtered convs derived from one input tensor at one version, kept on the tensor
    itself (``x._gf_pooled``), so that it lives no longer than the input: its patch sums per
    grid (one copy for every conv that reads it) and whether a reader counted the input."""

    __slots__ = ("version", "pooled", "counted")

    def __init__(self, version: int) -> None:
        self.version = version
        self.pooled: dict[tuple[int, ...], Tensor] = {}
        self.counted = False


def _reads_of(x: Tensor) -> _Reads:
    """The :class:`_Reads` of ``x`` at its current version (new ones after an in-place change)."""
    reads = getattr(x, "_gf_pooled", None)
    if reads is None or reads.version != x._version:
        reads = _Reads(x._version)
        x._gf_pooled = reads  # type: ignore[attr-defined]
    return reads


def _shared_pooled_input(x: Tensor, geometry: "_Geometry") -> tuple[Tensor, bool]:
    """The patch sums of ``x`` on this grid, computed once for every conv that reads ``x``.

    Parallel branches that read one tensor (ASPP, Inception) then keep one pooled
    copy between them, as plain convs keep one ``x`` between them. The copy hangs
    off ``x`` itself (so it lives no longer than ``x``) and is recomputed if ``x``
    changed in place. Returns the sums and whether this call made them.
    """
    grid_h, grid_w = geometry.grid_h, geometry.grid_w
    if torch.compiler.is_compiling():
        return pool_patches(x, grid_h, grid_w, on_input=True), True
    reads = _reads_of(x).pooled
    pooled = reads.get(geometry.grid)
    if pooled is not None:
        return pooled, False
    pooled = reads[geometry.grid] = pool_patches(x, grid_h, grid_w, on_input=True)
    return pooled, True


def _first_read(reads: _Reads) -> bool:
    """Whether this is the first patched conv whose backward needs the input whose
    :func:`_reads_of` is ``reads`` (a plain conv keeps it once)."""
    first = not reads.counted
    reads.counted = True
    return first


def _filter_counts(x: Tensor, weight_shape: torch.Size, geometry: "_Geometry", r: int, need_x: bool,
                   need_w: bool) -> tuple[int, int, int, int]:
    """The :class:`FilterStats` numbers of one filtered call: the bytes it keeps (the pooled
    input), the bytes a plain conv would keep (the input), and the backward multiply-adds
    of both."""
    c_out, c_in_group, kh, kw = weight_shape
    pairs = x.shape[0] * c_out * c_in_group
    patches = geometry.grid_h.patches * geometry.grid_w.patches
    atrous_taps = (kh if geometry.dilation[0] >= r else 1) * (kw if geometry.dilation[1] >= r else 1)
    out_cells = geometry.out_size[0] * geometry.out_size[1]
    kept = x.shape[0] * x.shape[1] * patches * pooled_dtype(x).itemsize if need_w else 0
    vanilla = x.numel() * x.element_size() if need_w else 0
    vanilla_macs = pairs * kh * kw * out_cells * (int(need_x) + int(need_w))
    filtered_macs = pairs * patches * (atrous_taps * int(need_x) + int(need_w))
    return kept, vanilla, vanilla_macs, filtered_macs


class _Geometry(NamedTuple):
    """A filtered conv's arguments, checked and normalised, and its patch grids."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    padding_str: str  # "same" / "valid", or "" for numeric padding
    dilation: tuple[int, int]
    out_size: tuple[int, int]
    grid_h: AxisGrid
    grid_w: AxisGrid
    # what the compiled CPU node takes (see _node_plan): stride, padding and dilation,
    # then per axis r, output padding before the grid, patches, input patch and input padding
    # (the grid is also the key of the pooled copy that the readers of an input share)
    conv: tuple[int, ...]
    grid: tuple[int, ...]
    node_takes: bool  # numeric padding, dilation < r on both axes (taps collapse): see _node_plan


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=1024, typed=True)  # typed: stride=True is refused, not taken for a cached 1
def _geometry_cached(in_size: tuple[int, int], kernel: tuple[int, int], stride: Any, padding: Any, dilation: Any,
                     r: int) -> _Geometry:
    stride_pair = _pair(stride, "stride")
    dilation_pair = _pair(dilation, "dilation")
    if isinstance(padding, str):
        padding_pair, padding_str = (0, 0), padding
    else:
        padding_pair, padding_str = _pair_or_zero(padding), ""
    if padding_str == "same":  # the output map keeps the input's size ('same' needs stride 1)
        out_size = (in_size[0], in_size[1])
    else:
        out_h, out_w = (
            (in_size[a] + 2 * padding_pair[a] - dilation_pair[a] * (kernel[a] - 1) - 1) // stride_pair[a] + 1
            for a in range(2)
        )
        out_size = (out_h, out_w)
    grid_h = AxisGrid.build(in_size[0], out_size[0], r, stride_pair[0])
    grid_w = AxisGrid.build(in_size[1], out_size[1], r, stride_pair[1])
    return _Geometry(stride_pair, padding_pair, padding_str, dilation_pair, out_size, grid_h, grid_w,
                     conv=(*stride_pair, *padding_pair, *dilation_pair),
                     grid=(*_grid_numbers(grid_h), *_grid_numbers(grid_w)),
                     node_takes=not padding_str and dilation_pair[0] < r and dilation_pair[1] < r)


def _geometry(x: Tensor, weight: Tensor, stride: IntPair, padding: Padding, dilation: IntPair, r: int,
              compiling: bool) -> _Geometry:
    """The conv's arguments checked and its patch grids, computed once per input size and
    settings: a cache lookup costs less than the checks, on every call."""
    if not compiling:
        try:
            return _geometry_cached(x.shape[2:], weight.shape[2:], _hashable(stride), _hashable(padding),
                                    _hashable(dilation), r)
        except TypeError:  # an unhashable argument: checked below without the cache, which says what is wrong
            pass
    return _geometry_cached.__wrapped__(x.shape[2:], weight.shape[2:], stride, padding, dilation, r)


def _plain_call_stats(x: Tensor, weight: Tensor, y: Tensor) -> FilterStats:
    """``r = 1`` (plain backprop): the conv keeps its input when its weight trains."""
    kept = x.numel() * x.element_size() if weight.requires_grad else 0
    taps = weight.shape[2] * weight.shape[3]
    macs = x.shape[0] * weight.shape[0] * weight.shape[1] * taps * y.shape[2] * y.shape[3]
    macs *= int(x.requires_grad) + int(weight.requires_grad)
    return FilterStats(kept_bytes=kept, vanilla_bytes=kept, backward_macs_vanilla=macs, backward_macs_filtered=macs)


@torch.library.custom_op("lightning_gf::filtered_conv2d", mutates_args=())
def _filtered_conv2d_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    pooled: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    padding_str: str,
    dilation: list[int],
    groups: int,
    r: int,
    stride_correction: bool,
) -> Tensor:
    """The conv itself; ``pooled`` (the patch sums of ``x``) only travels to backward."""
    return F.conv2d(x, weight, bias, stride, padding_str or padding, dilation, groups)


@_filtered_conv2d_op.register_fake
def _(x, weight, bias, pooled, stride, padding, padding_str, dilation, groups, r, stride_correction):  # type: ignore[no-untyped-def]
    return F.conv2d(x, weight, bias, stride, padding_str or padding, dilation, groups)


def _grid_numbers(grid: AxisGrid) -> tuple[int, int, int, int, int]:
    """One axis of a grid as the compiled backward takes it."""
    return grid.r, grid.out_before, grid.patches, grid.in_patch, grid.in_before


def _dense_or_depthwise(weight: Tensor, groups: int) -> bool:
    """Whether the conv is dense or depthwise: the two kinds the compiled backward takes."""
    return groups == 1 or (weight.shape[1] == 1 and weight.shape[0] == groups)


def _fused_backward_takes(grad_out: Tensor, weight: Tensor, channels_last: bool, dilation: list[int], groups: int,
                          r: int) -> bool:
    """Whether one compiled call does the whole backward (the steps below, without the Python
    between them, which took a tenth of a small map's backward): an NCHW ``g_y`` the kernels
    take, taps that collapse on both axes, a dense or depthwise conv."""
    return (
        not channels_last
        and dilation[0] < r
        and dilation[1] < r
        and _dense_or_depthwise(weight, groups)
        and grad_out.is_contiguous()
        and _use_kernels(grad_out)
    )


def _filtered_backward(
    grad_out: Tensor,
    pooled: Optional[Tensor],
    weight: Tensor,
    x_size: list[int],
    x_dtype: torch.dtype,
    channels_last: bool,
    stride: list[int],
    dilation: list[int],
    groups: int,
    r: int,
    stride_scale: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_x, g_w, g_b)`` of the filtered conv; an empty tensor for each one not needed."""
    grid_h = AxisGrid.build(x_size[2], grad_out.shape[2], r, stride[0])
    grid_w = AxisGrid.build(x_size[3], grad_out.shape[3], r, stride[1])
    if _fused_backward_takes(grad_out, weight, channels_last, dilation, groups, r):
        grid = [*_grid_numbers(grid_h), *_grid_numbers(grid_w)]
        return torch.ops.lightning_gf_cpu.filtered_backward(
            grad_out, pooled, weight, grid, x_size[2], x_size[3], groups, 1.0 / stride_scale, x_dtype,
            need_x, need_w, need_b,
        )
    gbar, total = _patch_means_and_total(grad_out, grid_h, grid_w)
    grad_x, grad_w, grad_b = (grad_out.new_empty(0) for _ in range(3))
    if need_x:
        low = _low_res_input_grad(gbar, weight, r, (dilation[0], dilation[1]), groups)
        grad_x = _spread_to_input(low, grid_h, grid_w, 1.0 / stride_scale, x_dtype, channels_last)
    if need_w:
        assert pooled is not None, "the pooled input is kept whenever the weight needs a gradient"
        grad_w = _weight_grad(gbar, pooled, weight.shape, groups, 1.0 / stride_scale, weight.dtype)
    if need_b:  # exact: the patch sums add up to sum(g_y)
        grad_b = total.to(weight.dtype)
    return grad_x, grad_w, grad_b


# The backward as an opaque op for torch.compile graphs (eager mode calls the function).
_filtered_conv2d_backward_op = torch.library.custom_op(
    "lightning_gf::filtered_conv2d_backward", _filtered_backward, mutates_args=()
)


@_filtered_conv2d_backward_op.register_fake
def _(grad_out, pooled, weight, x_size, x_dtype, channels_last, stride, dilation, groups, r, stride_scale,
      need_x, need_w, need_b):  # type: ignore[no-untyped-def]
    grad_x = grad_out.new_empty(0, dtype=x_dtype)
    if need_x:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        grad_x = torch.empty(x_size, dtype=x_dtype, device=grad_out.device, memory_format=fmt)
    grad_w = weight.new_empty(weight.shape if need_w else (0,))
    grad_b = weight.new_empty((weight.shape[0],) if need_b else (0,))
    return grad_x, grad_w, grad_b


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, _, pooled, stride, _, _, dilation, groups, r, stride_correction = inputs
    ctx.save_for_backward(pooled, weight)
    ctx.x_meta = (list(x.shape), x.dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    ctx.conf = (list(stride), list(dilation), groups, r, stride[0] * stride[1] if stride_correction else 1)


def _backward_with(backward_fn: Any, ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
    """Unpack what ``_setup_context`` saved, run ``backward_fn`` (the op or the function)."""
    pooled, weight = ctx.saved_tensors
    x_size, x_dtype, channels_last = ctx.x_meta
    stride, dilation, groups, r, stride_scale = ctx.conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x, grad_w, grad_b = backward_fn(
        grad_out, pooled, weight, x_size, x_dtype, channels_last, stride, dilation, groups, r, stride_scale,
        need_x, need_w, need_b,
    )
    return (grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None) + (None,) * 8


@once_differentiable(_NO_DOUBLE_BACKWARD)
def _backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
    return _backward_with(_filtered_conv2d_backward_op, ctx, grad_out)


_filtered_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


class _FilteredConv2dFunction(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager mode: an
    ``autograd.Function`` costs a tenth of a custom op's dispatch per call, which
    matters on small maps. ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], pooled: Optional[Tensor],  # type: ignore[override]
                stride: list[int], padding: list[int], padding_str: str, dilation: list[int], groups: int, r: int,
                stride_correction: bool) -> Tensor:
        inputs = (x, weight, bias, pooled, stride, padding, padding_str, dilation, groups, r, stride_correction)
        y = F.conv2d(x, weight, bias, stride, padding_str or padding, dilation, groups)
        _setup_context(ctx, inputs, y)
        return y

    @staticmethod
    @once_differentiable(_NO_DOUBLE_BACKWARD)
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        return _backward_with(_filtered_backward, ctx, grad_out)


# one call that says whether autocast is on for any device (a fifth of the per-device check's cost)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Cast as autocast casts ``conv2d``'s inputs (custom ops are not autocast by themselves)."""
    if not _any_autocast():
        return x, weight, bias
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    cast = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, weight, bias)]
    return cast[0], cast[1], cast[2]  # type: ignore[return-value]


class _NodePlan(NamedTuple):
    """What the compiled CPU node needs for one conv, worked out on its first call."""

    conv: tuple[int, ...]  # stride, padding, dilation
    grid: tuple[int, ...]  # see _Geometry.grid
    scale: float  # the stride correction, or 1
    counts: tuple[tuple[int, int, int, int], ...]  # _filter_counts, at 2 * need_x + need_w
    # whether the node asks for lightning_gf's own depthwise conv (csrc/depthwise_conv.cpp),
    # which runs the convs it takes: None until the first call in the node has checked that
    # it gives PyTorch's bits
    own_conv: Optional[bool] = False


# Each conv's plan for the compiled CPU node (csrc/filtered_conv.cpp), or _NO_NODE where
# the node never takes it, by the arguments that decide that. Every training step repeats
# the same calls, and a call that finds its plan here goes to the node at once, without
# the argument checks, the geometry lookup or the statistics' arithmetic. Between two
# convs (whose data push Python's own out of the caches) each Python call costs
# microseconds; in a filtered layer's forward they came to about 0.1 ms
# (docs/benchmarks-history.md, attempt 9). Bounded: cleared when full (inputs of ever
# new sizes).
_NODE_PLANS: dict[tuple[Any, ...], _NodePlan] = {}
_MAX_NODE_PLANS = 4096
_NO_NODE = _NodePlan((), (), 0.0, ())


def _node_plan(x: Tensor, weight: Tensor, stride: IntPair, padding: Padding, dilation: IntPair, groups: int,
               r: int, stride_correction: bool) -> _NodePlan:
    """The node's plan for this conv, or _NO_NODE where it never takes it: it takes 4-D
    inputs of the kernels' dtypes, numeric padding, taps that collapse (dilation < r), and
    dense or depthwise convs. What may change from call to call (a contiguous plain CPU
    input, the kernels on, no autocast, no JIT tracing) is checked on every call."""
    if _node_declines(x, weight, stride, padding, dilation, groups, r) is not None:
        return _NO_NODE
    geometry = _geometry(x, weight, stride, padding, dilation, r, False)
    scale = 1.0 / (geometry.stride[0] * geometry.stride[1]) if stride_correction else 1.0
    counts = tuple(_filter_counts(x, weight.shape, geometry, r, need_x, need_w)
                   for need_x in (False, True) for need_w in (False, True))
    own_conv = None if x.dtype == torch.float32 and groups == x.shape[1] == weight.shape[0] else False
    return _NodePlan(geometry.conv, geometry.grid, scale, counts, own_conv)


def _node_declines(x: Tensor, weight: Tensor, stride: IntPair, padding: Padding, dilation: IntPair, groups: int,
                   r: int) -> Optional[str]:
    """Why the compiled node never takes this conv, or None where its plan lets it (the
    conditions that hold for every call with the same arguments)."""
    if x.dim() != 4:
        return "the input is not 4-D"
    if r == 1:
        return "r = 1 (the plain conv)"
    if x.dtype not in _KERNEL_DTYPES:
        return f"dtype {x.dtype} is not one of the kernels'"
    geometry = _geometry(x, weight, stride, padding, dilation, r, False)
    if geometry.padding_str:
        return f"padding={geometry.padding_str!r} (the node takes numeric padding)"
    if not geometry.node_takes:
        return f"dilation {geometry.dilation} >= r = {r}: atrous taps keep their shape"
    if not _dense_or_depthwise(weight, groups):
        return f"groups={groups} is neither dense nor depthwise"
    return None


def _node_declines_now(x: Tensor) -> Optional[str]:
    """Why the compiled node does not take this call although its plan would (what may
    change from call to call), or None."""
    if torch._C._get_tracing_state():
        return "JIT tracing"
    if _any_autocast():
        return "autocast is on"
    if type(x) is not Tensor or not x.is_cpu:
        return f"the input is a {type(x).__name__} on {x.device.type}, not a plain CPU tensor"
    if config.get_backend() not in (None, "cpu"):
        return f"backend pinned: {config.get_backend()}"
    if not cpu_kernels.available():
        return "the compiled CPU kernels are off or could not be built"
    if not x.is_contiguous():
        return "the input is not contiguous NCHW (channels_last?)"
    return None


_ROUTES_SAID: set[tuple[Any, ...]] = set()


def _say_route(key: Optional[tuple[Any, ...]], route: str, why: str) -> None:
    """Log, at debug level and once per conv and route, which route a filtered conv takes and why."""
    said = (key, route, why)
    if said not in _ROUTES_SAID:
        if len(_ROUTES_SAID) >= _MAX_NODE_PLANS:  # inputs of ever new sizes: bounded, as the plans
            _ROUTES_SAID.clear()
        _ROUTES_SAID.add(said)
        shape = tuple(key[0]) if key is not None else "?"
        _LOG.debug("lightning_gf: filtered conv on input %s takes %s: %s", shape, route, why)


def _own_depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], conv: tuple[int, ...],
                          groups: int) -> Tensor:
    """What the node's forward computes with ``own_conv`` (``csrc/depthwise_conv.cpp`` where it
    takes the conv, else PyTorch's conv), without autograd."""
    return torch.ops.lightning_gf_cpu.depthwise_conv2d(x, weight, bias, list(conv), groups)


def _own_conv_agrees(x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: _NodePlan, stride: IntPair,
                     padding: Padding, dilation: IntPair, groups: int) -> bool:
    """Whether the node's own depthwise conv gives PyTorch's conv bit for bit on this input.
    It adds in the order of oneDNN's depthwise kernel, which PyTorch's CPU conv runs; a
    PyTorch built or set otherwise may add in another. Asked once per conv, on its first call
    in the node (an input holding NaN fails it: PyTorch's conv stays)."""
    with torch.no_grad():
        own = _own_depthwise_conv2d(x, weight, bias, plan.conv, groups)
        return torch.equal(own, F.conv2d(x, weight, bias, stride, padding, dilation, groups))


@functools.cache
def _cpu_node_op() -> Any:
    """The node's op, looked up once (four attribute lookups a call otherwise)."""
    return torch.ops.lightning_gf_cpu.filtered_conv2d.default


def _add_call_counts(stats: FilterStats, counts: tuple[int, int, int, int], pooled_here: bool,
                     reads: Optional[_Reads]) -> None:
    """Adds one filtered call's :func:`_filter_counts` to a layer's statistics; ``reads`` is the
    input's :func:`_reads_of` where the weight needs a gradient, else None."""
    kept_bytes, vanilla_bytes, vanilla_macs, filtered_macs = counts
    if not pooled_here:  # another filtered conv already keeps (and counted) these sums
        kept_bytes = 0
    if reads is not None and not _first_read(reads):  # a plain conv would keep this input once
        vanilla_bytes = 0
    stats.add_counts(kept_bytes, vanilla_bytes, vanilla_macs, filtered_macs)


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
    compiling = torch.compiler.is_compiling()
    if not compiling:
        try:
            key: Optional[tuple[Any, ...]] = (
                input.shape, input.dtype, weight.shape, stride, padding, dilation, groups, r, stride_correction,
                type(stride), type(padding), type(dilation), type(groups),  # types: True is 1 to a dict
                torch._C._get_mkldnn_enabled())  # which conv PyTorch runs (see _own_conv_agrees)
            plan = _NODE_PLANS.get(key)
        except TypeError:  # a list among the arguments: no key
            key, plan = None, None
        if plan is None:  # this conv's first call
            plan = _node_plan(input, weight, stride, padding, dilation, groups, r, stride_correction)
            if key is not None:
                if len(_NODE_PLANS) >= _MAX_NODE_PLANS:
                    _NODE_PLANS.clear()
                _NODE_PLANS[key] = plan
        if (plan is not _NO_NODE and input.is_contiguous() and _use_kernels(input) and not _any_autocast()
                and not torch._C._get_tracing_state()):
            # the compiled node, forward and backward; it pools the input itself unless another
            # filtered conv already did (the copy shared as in _shared_pooled_input)
            grad_on = torch.is_grad_enabled()
            need_w = grad_on and weight.requires_grad
            reads = _reads_of(input) if need_w else None
            pooled = None if reads is None else reads.pooled.get(plan.grid)
            if plan.own_conv is None:  # a depthwise conv's first call in the node
                own = key is not None and _own_conv_agrees(input, weight, bias, plan, stride, padding, dilation,
                                                           groups)
                plan = plan._replace(own_conv=own)
                if key is not None:
                    _NODE_PLANS[key] = plan
            y, kept = _cpu_node_op()(input, weight, bias, pooled, plan.conv, groups, plan.grid, plan.scale, need_w,
                                     plan.own_conv, _NO_DOUBLE_BACKWARD)
            if reads is not None and pooled is None:
                reads.pooled[plan.grid] = kept
            if _stats is not None:
                _add_call_counts(_stats, plan.counts[2 * (grad_on and input.requires_grad) + need_w], pooled is None,
                                 reads)
            if _LOG.isEnabledFor(logging.DEBUG):
                _say_route(key, "the compiled C++ node", "forward and backward in one autograd node")
            return y
        if _LOG.isEnabledFor(logging.DEBUG):
            why = (_node_declines(input, weight, stride, padding, dilation, groups, r) if plan is _NO_NODE
                   else _node_declines_now(input))
            _say_route(key, "the Python autograd Function", f"the C++ node declines: {why}")
    if input.dim() != 4:
        raise ValueError(f"filtered_conv2d takes a 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
    geometry = _geometry(input, weight, stride, padding, dilation, r, compiling)
    if r == 1:
        out = F.conv2d(input, weight, bias, geometry.stride, padding, geometry.dilation, groups)
        if _stats is not None and torch.is_grad_enabled() and not compiling:
            call = _plain_call_stats(input, weight, out)
            if weight.requires_grad and not _first_read(_reads_of(input)):  # kept once for every reader
                call.kept_bytes = call.vanilla_bytes = 0
            _stats.add(call)
        return out
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and input.requires_grad, grad_on and weight.requires_grad
    pooled, first_use = _shared_pooled_input(input, geometry) if need_w else (None, True)
    x, w, b = _autocast_inputs(input, weight, bias)
    conv = _filtered_conv2d_op if compiling else _FilteredConv2dFunction.apply
    y = conv(x, w, b, pooled, list(geometry.stride), list(geometry.padding), geometry.padding_str,
             list(geometry.dilation), groups, r, stride_correction)
    if _stats is not None and not compiling:
        _add_call_counts(_stats, _filter_counts(input, weight.shape, geometry, r, need_x, need_w), first_use,
                         _reads_of(input) if need_w else None)
    return y
