"""``ImageClassifier``: any timm model as a LightningModule, with the paper's optimiser."""

from __future__ import annotations

from typing import Any, Optional

import timm
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_gf.app.models.checkpoint import load_weights
from lightning_gf.app.models.optim import check_optimizer_args
from lightning_gf.app.models.task_module import TaskModule


class ImageClassifier(TaskModule):
    """Image classification over a timm model, by name.

    Args:
        model_name: any ``timm.list_models()`` name, e.g. ``'resnet18'``.
        num_classes: size of the classifier head.
        pretrained: let timm fetch its pretrained weights (needs the network).
        checkpoint_path: local weights to start from instead (a timm ``state_dict`` file,
            or a checkpoint of this module); a head of another size is left re-initialised.
        optimizer: ``'sgd'`` (the paper: lr 0.05, cosine) or ``'adamw'``.
        lr, momentum, weight_decay: optimiser settings.
        warmup_ratio: share of the training steps with a linear warm-up before the cosine decay.
        model_kwargs: more keyword arguments for ``timm.create_model``.

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``val/acc_top5`` (and ``test/...``).
    The optimiser only gets the parameters that still require grad when it is built,
    so the ``GradientFilterCallback`` (which freezes in ``setup``) decides what trains.

    Example:
        >>> m = ImageClassifier("resnet18", num_classes=3)
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        model_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(optimizer, lr, warmup_ratio)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if model_name not in timm.list_models():
            raise ValueError(f"unknown timm model {model_name!r}: pick a name from timm.list_models()")
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **(model_kwargs or {}))
        if checkpoint_path:
            load_weights(self.model, checkpoint_path)
        top_k = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(num_classes, top_k=k)
            for stage in ("val", "test") for name, k in (("acc", 1), ("acc_top5", top_k))
        })

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=len(labels))
        for name in ("acc", "acc_top5"):
            metric = self.metrics[f"{stage}_{name}"]
            metric(logits, labels)
            self.log(f"{stage}/{name}", metric, prog_bar=name == "acc", batch_size=len(labels))
