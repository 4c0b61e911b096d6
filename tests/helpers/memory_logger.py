"""A Lightning logger that keeps what it is given, for tests to read back."""

from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl


class MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in ``rows``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[Optional[int], dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))
