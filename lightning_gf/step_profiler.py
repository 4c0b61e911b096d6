"""``StepProfiler``: per training step, the memory kept for backward (measured), backward
time, step time and loss. Used by the demo; works in any ``pytorch_lightning`` fit."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor

_MIB = 2**20


@dataclass
class StepRecord:
    """One training step: ``kept_mb`` is the size of every tensor autograd kept for backward
    (unique storages, parameters left out), read off the real tensors; ``gf_activation_mb``
    what the gradient-filter's layers kept (as the callback's ``gf/activation_mb``)."""

    loss: float
    kept_mb: float
    backward_s: float
    step_s: float
    gf_activation_mb: Optional[float] = None


@dataclass
class _Pending:
    storages: dict[int, int] = field(default_factory=dict)
    start: float = 0.0
    backward_start: float = 0.0
    backward_s: float = 0.0


class StepProfiler(pl.Callback):
    """Records a :class:`StepRecord` per training step in ``self.steps``.

    The memory is measured with ``torch.autograd.graph.saved_tensors_hooks`` around the
    forward: every tensor saved for backward counts once per storage; parameters count
    zero (they are kept anyway). Times are wall-clock (``time.perf_counter``).

    Example:
        >>> profiler = StepProfiler()
        >>> profiler.steps
        []
    """

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self._pending: Optional[_Pending] = None
        self._hooks: Any = None
        self._params: set[int] = set()

    def _pack(self, t: Tensor) -> Tensor:
        if self._pending is not None:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self._params:
                self._pending.storages[ptr] = storage.nbytes()
        return t.detach()  # not t itself (see lightning_gf.saved_tensors.SavedTensorMeter._pack)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        self._pending = _Pending(start=time.perf_counter())
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()

    def _close_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._close_hooks()
        if self._pending is not None:
            self._pending.backward_start = time.perf_counter()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._pending.backward_s = time.perf_counter() - self._pending.backward_start

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close_hooks()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        filters = [cb.handle for cb in trainer.callbacks if getattr(cb, "handle", None) is not None]
        gf = sum(h.stats.kept_bytes for h in filters) / _MIB if filters else None
        self.steps.append(StepRecord(
            loss=float(loss),
            kept_mb=sum(pending.storages.values()) / _MIB,
            backward_s=pending.backward_s,
            step_s=time.perf_counter() - pending.start,
            gf_activation_mb=gf,
        ))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_hooks()
