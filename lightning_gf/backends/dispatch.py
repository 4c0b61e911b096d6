"""The one dispatcher: each step of a filtered conv runs on the first backend that takes it.

The order is ``config.BACKENDS`` (``cpu``, ``triton``, ``small_maps``, ``reference``). Each
backend says, per step, why it declines an input (``declines...`` -> a reason, or None
where it takes it); ``reference`` takes everything. With a backend pinned
(:func:`lightning_gf.config.force_backend`) only that one is asked, and ``reference`` runs
what it declines. At debug level the logger ``lightning_gf.backends.dispatch`` says once
per step and input kind which backend runs it and why the ones before it declined.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_gf import config
from lightning_gf.backends import cpu, reference, small_maps, triton

_LOG = logging.getLogger(__name__)
Declines = Optional[Callable[..., Optional[str]]]
# step -> ((backend, declines, run), ...) in the order of config.BACKENDS
_STEPS: dict[str, tuple[tuple[str, Declines, Callable[..., Any]], ...]] = {
    "pool": (("cpu", cpu.declines, cpu.pool), ("triton", triton.declines, triton.pool),
             ("small_maps", small_maps.declines_pool, small_maps.pool), ("reference", None, reference.pool)),
    "means": (("cpu", cpu.declines, cpu.means_and_total), ("triton", triton.declines, triton.means_and_total),
              ("small_maps", small_maps.declines_means, small_maps.means_and_total),
              ("reference", None, reference.means_and_total)),
    "spread": (("cpu", cpu.declines_spread, cpu.spread), ("triton", triton.declines, triton.spread),
               ("small_maps", small_maps.declines_spread, small_maps.spread), ("reference", None, reference.spread)),
    "taps": (("cpu", cpu.declines, cpu.tap_sums), ("reference", None, reference.tap_sums)),
    "broadcast": (("cpu", cpu.declines, cpu.broadcast), ("reference", None, reference.broadcast)),
}
assert all([name for name, _, _ in table] == [b for b in config.BACKENDS if b in {n for n, _, _ in table}]
           for table in _STEPS.values()), "each step's backends in the order of config.BACKENDS"

_SAID: set[tuple[Any, ...]] = set()
_MAX_SAID = 4096


def _describe(args: tuple[Any, ...]) -> tuple[Any, ...]:
    t = args[0]
    layout = "channels_last" if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not (
        t.is_contiguous()) else "contiguous" if t.is_contiguous() else "strided"
    return tuple(t.shape), str(t.dtype).replace("torch.", ""), t.device.type, layout


def _say(step: str, chosen: str, args: tuple[Any, ...]) -> None:
    what = _describe(args)
    key = (step, chosen, what)
    if key in _SAID:
        return
    if len(_SAID) >= _MAX_SAID:
        _SAID.clear()
    _SAID.add(key)
    forced = config.get_backend()
    declined = []
    for name, declines, _ in _STEPS[step]:
        if name == chosen:
            break
        if forced is not None and name != forced:
            declined.append(f"{name}: another backend is pinned ({forced})")
        elif declines is not None:
            declined.append(f"{name}: {declines(*args)}")
    _LOG.debug("lightning_gf: %s of a %s %s %s map on %s (%s) runs on %s%s", step, what[0], what[1], what[3],
               what[2], f"pinned: {forced}" if forced else "default order", chosen,
               "; declined by " + "; ".join(declined) if declined else "")


def route(step: str, *args: Any) -> Callable[..., Any]:
    """The function of the first backend that takes step ``step`` on ``args``.

    Example:
        >>> from lightning_gf.ops.patch_grid import AxisGrid
        >>> g = AxisGrid.build(in_size=4, out_size=4, r=2, stride=1)
        >>> with config.force_backend("reference"):
        ...     route("pool", torch.ones(1, 1, 4, 4), g, g) is reference.pool
        True
    """
    forced = config._FORCED
    for name, declines, run in _STEPS[step]:
        if forced is not None and name != forced and name != "reference":
            continue
        if declines is None or declines(*args) is None:
            if not torch.compiler.is_compiling() and _LOG.isEnabledFor(logging.DEBUG):  # dynamo traces no logger
                _say(step, name, args)
            return run
    raise AssertionError(f"no backend took step {step!r}: the reference takes every input")


def backend_of(step: str, *args: Any) -> str:
    """The name of the backend that runs ``step`` on ``args`` (what :func:`route` picks)."""
    run = route(step, *args)
    return next(name for name, _, fn in _STEPS[step] if fn is run)


def pool(t: Tensor, grid_h: Any, grid_w: Any, on_input: bool) -> Tensor:
    """Patch sums of ``t`` over the grid's input (or output) patches."""
    return route("pool", t, grid_h, grid_w)(t, grid_h, grid_w, on_input)


def means_and_total(grad_out: Tensor, grid_h: Any, grid_w: Any) -> tuple[Tensor, Tensor]:
    """Patch means of ``grad_out`` over the valid cells of its output patches, and its per-channel total."""
    return route("means", grad_out, grid_h, grid_w)(grad_out, grid_h, grid_w)


def spread(low: Tensor, height: int, width: int, grid_h: Any, grid_w: Any, scale: float, dtype: torch.dtype,
           channels_last: bool) -> Tensor:
    """``g_x``: ``scale`` times each patch value of ``low`` over its input patch, ``height x width``."""
    run = route("spread", low, height, width, grid_h, grid_w, channels_last)
    return run(low, height, width, grid_h, grid_w, scale, dtype, channels_last)


def tap_sums(w: Tensor) -> Tensor:
    """The sum of each kernel's taps, ``(C_out, C_in/groups)``."""
    return route("taps", w)(w)


def broadcast(per_pair: Tensor, weight_shape: torch.Size, scale: float, dtype: torch.dtype) -> Tensor:
    """``g_w``: ``scale`` times each (out, in) pair's value over every tap."""
    return route("broadcast", per_pair)(per_pair, weight_shape, scale, dtype)
