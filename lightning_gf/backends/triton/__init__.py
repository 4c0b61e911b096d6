"""Triton kernels for the filter's memory-bound steps on CUDA: one pass each.

- :func:`patch_pool` reads a map once and writes its patch sums (or means), and the
  per-channel total (the exact bias gradient) on the side. The forward pools the
  input with it, the backward pools the output gradient.
- :func:`patch_spread` writes ``g_x`` once: each input cell takes the value of its
  patch, scaled and cast, with the crop to the input map folded in.

Both read and write any strides (NCHW, channels_last, or the channel-major maps the
products make), accumulate in float32 (float64 for float64) and take float32,
float64, bfloat16 and float16. Pooled maps come out channel-major, ``(C, N, Ph, Pw)``
in memory, returned as an ``(N, C, Ph, Pw)`` view, so each low-resolution product is
one matrix product without copies.

They are used for CUDA tensors when Triton imports (it ships with PyTorch's CUDA
wheels); ``LIGHTNING_GF_TRITON=0`` turns them off. On a machine without a GPU they
run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how
the tests check them: :func:`enable_on` adds ``"cpu"`` to the device types they take.

Example:
    >>> import lightning_gf.backends.triton as triton_kernels
    >>> isinstance(triton_kernels.available(), bool)
    True
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_gf import config
from lightning_gf.backends.reference import pooled_dtype

ENV_SWITCH = "LIGHTNING_GF_TRITON"
_LOG = logging.getLogger(__name__)
_device_types = {"cuda"}
_INT32_LIMIT = 2**31 - 1  # the kernels index with 32-bit integers

# Triton ships with PyTorch's CUDA wheels on Linux; without it the plain path runs. It is
# imported, and the kernels defined, on first use only (CPU users never pay for it).
_INSTALLED = importlib.util.find_spec("triton") is not None


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """Whether the Triton kernels can run: Triton imports and ``LIGHTNING_GF_TRITON`` is not ``0``.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _INSTALLED and not _switched_off()


def enable_on(device_type: str) -> None:
    """Also run the kernels on tensors of ``device_type`` (``"cpu"``: under ``TRITON_INTERPRET=1``, for tests).

    Example:
        >>> enable_on("cuda")  # the default already
    """
    _device_types.add(device_type)


def disable_on(device_type: str) -> None:
    """Stop running the kernels on tensors of ``device_type`` (undoes :func:`enable_on`).

    Example:
        >>> enable_on("cpu"); disable_on("cpu")
        >>> takes(torch.ones(4))
        False
    """
    _device_types.discard(device_type)


_SKIPPED: set[str] = set()


def takes(t: Tensor) -> bool:
    """Whether the kernels take ``t``: its device type is enabled, Triton is available, and it is small enough
    for 32-bit indexing (anything else runs the plain path; a map too large is said once in the debug log).

    Example:
        >>> takes(torch.ones(4))  # a CPU tensor: only CUDA ones by default
        False
    """
    forced = config._FORCED
    if forced is not None and forced != "triton":
        return False
    if (forced is None and t.device.type not in _device_types) or not available() or t.numel() == 0:
        return False
    if t.numel() > _INT32_LIMIT:
        reason = "maps of over 2**31 elements"
        if reason not in _SKIPPED:
            _SKIPPED.add(reason)
            _LOG.debug("lightning_gf: Triton kernels skip %s; the plain PyTorch path runs", reason)
        return False
    return True


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(channel_fastest: bool, channels: int, minor: int, per_minor: int) -> tuple[int, int]:
    """Block sizes ``(channels, minor)`` of a tile of about 1024 elements, wide along the fastest axis."""
    if channel_fastest:
        block_c = min(_pow2(channels), 64)
        return block_c, max(1, min(_pow2(minor), 1024 // (block_c * per_minor)))
    block_minor = max(1, min(_pow2(minor), 128 // per_minor))
    return max(1, min(_pow2(channels), 1024 // (block_minor * per_minor))), block_minor


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """The jitted kernels, imported on first use (``TRITON_INTERPRET`` is read then)."""
    import triton

    from lightning_gf.backends.triton import kernels as triton_patch_kernels

    return SimpleNamespace(pool=triton_patch_kernels.pool_kernel, spread=triton_patch_kernels.spread_kernel,
                           cdiv=triton.cdiv)


def patch_pool(
    t: Tensor, kh: int, kw: int, before_h: int, before_w: int, patches_h: int, patches_w: int, *,
    mean: bool, total: bool, out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor]:
    """Sums (or means over the cells inside the map) of ``t`` over a grid of ``kh x kw`` patches.

    Patch ``(i, j)`` covers rows ``i*kh - before_h ...`` and columns ``j*kw - before_w ...``;
    cells outside ``t`` count zero. Returns the ``(N, C, patches_h, patches_w)`` map (stored
    channel-major, as ``out_dtype``, default float32 or float64) and, with ``total``, the
    per-channel sum of ``t`` in float32/float64 (else an empty tensor).

    Example:
        >>> # on CUDA; on CPU only under TRITON_INTERPRET=1 with enable_on("cpu")
        >>> # patch_pool(torch.ones(1, 1, 4, 4, device="cuda"), 2, 2, 0, 0, 2, 2, mean=False, total=False)[0]
    """
    n, c, h, w = t.shape
    acc = _accumulation(t.dtype)
    out = torch.empty((c, n, patches_h, patches_w), dtype=out_dtype or acc, device=t.device)
    kw_pow2 = _pow2(kw)
    channel_fastest = t.stride(1) == 1 and c > 1
    block_c, block_p = _tile(channel_fastest, c, patches_w, kw_pow2)
    k = _kernels()
    grid = (n * patches_h, k.cdiv(c, block_c), k.cdiv(patches_w, block_p))
    partial = torch.empty((grid[0] * grid[2], c) if total else (1,), dtype=acc, device=t.device)
    k.pool[grid](
        t, out, partial, c, h, w, patches_h, patches_w, *t.stride(), before_h, before_w,
        KH=kh, KW=kw, KW_POW2=kw_pow2, MEAN=mean, TOTAL=total, ACC_F64=acc == torch.float64,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4,
    )
    sums = partial.sum(0) if total else t.new_empty(0, dtype=acc)
    return out.permute(1, 0, 2, 3), sums


def patch_spread(
    low: Tensor, height: int, width: int, kh: int, kw: int, before_h: int, before_w: int, scale: float,
    dtype: torch.dtype, channels_last: bool,
) -> Tensor:
    """``g_x``: each cell of a ``height x width`` map takes ``scale`` times the value of its patch.

    ``low`` is ``(N, C, Ph, Pw)`` with any strides; cell ``(y, x)`` lies in patch
    ``((y + before_h) // kh, (x + before_w) // kw)``, and cells outside the grid get zero.
    The result is ``dtype``, NCHW or channels_last.

    Example:
        >>> # on CUDA; on CPU only under TRITON_INTERPRET=1 with enable_on("cpu")
        >>> # patch_spread(torch.ones(1, 1, 2, 2, device="cuda"), 4, 4, 2, 2, 0, 0, 0.25, torch.float32, False)
    """
    n, c, patches_h, patches_w = low.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((n, c, height, width), dtype=dtype, device=low.device, memory_format=fmt)
    block_c, block_w = _tile(channels_last and c > 1, c, width, 1)
    k = _kernels()
    grid = (n * height, k.cdiv(c, block_c), k.cdiv(width, block_w))
    k.spread[grid](
        low, out, c, height, width, patches_h, patches_w, *low.stride(), *out.stride(), before_h, before_w,
        float(scale), KH=kh, KW=kw, ACC_F64=low.dtype == torch.float64, BLOCK_C=block_c, BLOCK_W=block_w, num_warps=4,
    )
    return out


# --- the steps of the filtered conv on these kernels (see docs/architecture.md) ----------

NAME = "triton"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def declines(t: Tensor, *_: object) -> Optional[str]:
    """Why the kernels do not take ``t`` (None: they do): a plain tensor of their dtypes on
    an enabled device (CUDA; any device where this backend is pinned), outside tracing."""
    if not takes(t):  # first: False at once for CPU tensors
        return "not on a device the kernels run on, Triton off or missing, or a map over 2**31 elements"
    if t.dtype not in DTYPES or type(t) is not Tensor:
        return "not a plain tensor of the kernels' dtypes"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    return None


def _patch_pool(t: Tensor, grid_h: Any, grid_w: Any, on_input: bool, mean: bool,
                total: bool) -> tuple[Tensor, Tensor]:
    kh, before_h, _ = grid_h.cells(on_input)
    kw, before_w, _ = grid_w.cells(on_input)
    return patch_pool(t, kh, kw, before_h, before_w, grid_h.patches, grid_w.patches, mean=mean, total=total,
                      out_dtype=pooled_dtype(t))


def pool(t: Tensor, grid_h: Any, grid_w: Any, on_input: bool) -> Tensor:
    """Patch sums of ``t`` in one pass, any strides."""
    return _patch_pool(t, grid_h, grid_w, on_input, False, False)[0]


def means_and_total(grad_out: Tensor, grid_h: Any, grid_w: Any) -> tuple[Tensor, Tensor]:
    """The patch means of ``grad_out`` and its per-channel total, in one pass."""
    return _patch_pool(grad_out, grid_h, grid_w, False, True, True)


def spread(low: Tensor, height: int, width: int, grid_h: Any, grid_w: Any, scale: float, dtype: torch.dtype,
           channels_last: bool) -> Tensor:
    """``g_x`` written once, in the input's layout."""
    return patch_spread(low, height, width, grid_h.in_patch, grid_w.in_patch, grid_h.in_before, grid_w.in_before,
                        scale, dtype, channels_last)
