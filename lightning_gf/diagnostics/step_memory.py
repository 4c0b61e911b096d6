"""What plain backprop would keep for backward beyond what the filter keeps, measured.

A training step's own graph is measured as it runs (:class:`SavedTensorMeter`). Plain
backprop's is not there to measure, so :class:`PlainBackpropMemory` runs the model's
forward on a few samples of the batch twice, once filtered and once with
:meth:`GradientFilterHandle.plain` (the same trainable set), measures what autograd keeps
in each, and extends the difference linearly to the batch's size: every tensor autograd
keeps in a CNN has the batch dimension or none, so the difference is affine in it. No
backward runs, and the model is left as it was (buffers, flags, random generators).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from lightning_gf.diagnostics.model_state import model_state_kept
from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter
from lightning_gf.surgery.handle import GradientFilterHandle
from lightning_gf.surgery.tracing import (
    call_model,
    samples_in,
    take_samples,
    tensors_in,
)

# The sample counts the difference is measured at; a batch of at most the larger one is measured whole.
_SAMPLES = (2, 3)


def _signature(inputs: Any, model: nn.Module) -> tuple[Any, ...]:
    """What decides the kept bytes per sample: shapes (less the batch), dtypes, layouts, modes."""
    leaves = tuple(
        (tuple(t.shape[1:]), t.dtype, t.device, t.requires_grad,
         t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous())
        for t in tensors_in(inputs)
    )
    autocast = tuple(
        torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None for d in ("cpu", "cuda")
    )
    return leaves, model.training, autocast


class PlainBackpropMemory:
    """Bytes plain backprop keeps for backward beyond the filter, per model input, measured.

    Args:
        model: the filtered model.
        handle: its :class:`GradientFilterHandle`.
        context: a context manager factory the forwards run under (e.g. the Trainer's
            precision context, so that they see the step's autocast).

    Example:
        >>> from lightning_gf import apply_gradient_filter
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        >>> handle = apply_gradient_filter(net, r=2, depth=1, example_input=torch.zeros(1, 3, 8, 8))
        >>> extra = PlainBackpropMemory(net, handle).extra_bytes(torch.zeros(4, 3, 8, 8))
        >>> extra == 4 * 8 * 8 * 8 * 4 - 4 * 8 * 4 * 4 * 4  # the conv's input, less its patch sums
        True
        >>> handle.remove()
    """

    def __init__(self, model: nn.Module, handle: GradientFilterHandle,
                 context: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        self._model = model
        self._handle = handle
        self._context = context
        self._measured: dict[tuple[Any, ...], int] = {}

    def _kept(self, inputs: Any, plain: bool) -> int:
        meter = SavedTensorMeter(isolated=True)  # the side forwards never count in a step being measured
        meter.skip_parameters_of(self._model, buffers=True)
        with self._context(), torch.enable_grad(), (self._handle.plain() if plain else nullcontext()), meter:
            out = call_model(self._model, inputs)
        del out
        return meter.total_bytes

    def _difference(self, inputs: Any, samples: int) -> int:
        key = (_signature(inputs, self._model), samples)
        if key not in self._measured:
            inputs = take_samples(inputs, samples)
            counters = [replace(layer.module.gf_stats) for layer in self._handle.layers]  # type: ignore[attr-defined]
            try:
                with model_state_kept(self._model):
                    self._measured[key] = self._kept(inputs, plain=True) - self._kept(inputs, plain=False)
            finally:
                for layer, stats in zip(self._handle.layers, counters):
                    layer.module.gf_stats = stats  # type: ignore[attr-defined]
        return self._measured[key]

    def extra_bytes(self, inputs: Any) -> int:
        """Plain backprop's kept bytes less the filter's, for one forward of ``inputs``
        (measured once per input shape, layout, dtype and mode)."""
        n = samples_in(inputs)
        if n is None or n <= _SAMPLES[-1]:
            return self._difference(inputs, n or 0)
        small, large = (self._difference(inputs, k) for k in _SAMPLES)
        per_sample = (large - small) // (_SAMPLES[1] - _SAMPLES[0])
        return small + (n - _SAMPLES[0]) * per_sample
