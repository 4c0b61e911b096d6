"""``StepProfiler``: per training step, the memory kept for backward (measured), backward
time, step time and loss. Used by the demo; works in any ``pytorch_lightning`` fit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import pytorch_lightning as pl
from torch import Tensor

from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter

_MIB = 2**20


@dataclass
class StepRecord:
    """One training step: ``kept_mb`` is the size of every tensor autograd kept for backward
    (unique storages, parameters left out), read off the real tensors; ``gf_activation_mb``
    what the gradient filter's conv layers themselves kept, measured the same way."""

    loss: float
    kept_mb: float
    backward_s: float
    step_s: float
    gf_activation_mb: Optional[float] = None


@dataclass
class _Pending:
    meter: SavedTensorMeter
    filtered: bool
    start: float = 0.0
    backward_start: float = 0.0
    backward_s: float = 0.0


class StepProfiler(pl.Callback):
    """Records a :class:`StepRecord` per training step in ``self.steps``.

    The memory is measured with :class:`lightning_gf.diagnostics.saved_tensors.SavedTensorMeter`
    around the forward: every tensor saved for backward counts once per storage;
    parameters count zero (they are kept anyway). Times are wall-clock
    (``time.perf_counter``).

    Example:
        >>> profiler = StepProfiler()
        >>> profiler.steps
        []
    """

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self._pending: Optional[_Pending] = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        handles = [cb.handle for cb in trainer.callbacks if getattr(cb, "handle", None) is not None]
        layers = [(f"{i}.{layer.name}", layer.module) for i, h in enumerate(handles) for layer in h.layers]
        meter = SavedTensorMeter(layers)
        meter.skip_parameters_of(pl_module)
        self._pending = _Pending(meter=meter, filtered=bool(handles), start=time.perf_counter())
        meter.__enter__()

    def _close_meter(self) -> None:
        if self._pending is not None:
            self._pending.meter.close()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._close_meter()
        if self._pending is not None:
            self._pending.backward_start = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._pending.backward_s = time.perf_counter() - self._pending.backward_start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close_meter()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(StepRecord(
            loss=float(loss),
            kept_mb=pending.meter.total_bytes / _MIB,
            backward_s=pending.backward_s,
            step_s=time.perf_counter() - pending.start,
            gf_activation_mb=pending.meter.bytes_in_layers / _MIB if pending.filtered else None,
        ))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_meter()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_meter()
