"""What the classifier and the segmenter share: evaluation steps, prediction, optimizer."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch import Tensor

from lightning_gf.app.models.optim import build_optimizer


class TaskModule(pl.LightningModule):
    """Base of :class:`ImageClassifier` and :class:`SemanticSegmenter`.

    Subclasses define ``forward``, ``training_step`` and ``_evaluate(batch, stage)``,
    and save ``optimizer``, ``lr``, ``weight_decay``, ``momentum`` and ``warmup_ratio``
    as hyperparameters.
    """

    def _evaluate(self, batch: Any, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class indices per image (classification) or per pixel (segmentation)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(1)

    def configure_optimizers(self) -> dict[str, Any]:
        h = self.hparams
        return build_optimizer(self.parameters(), optimizer=h.optimizer, lr=h.lr, weight_decay=h.weight_decay,
                               momentum=h.momentum, warmup_ratio=h.warmup_ratio,
                               total_steps=self.trainer.estimated_stepping_batches)
