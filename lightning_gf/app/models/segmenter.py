"""``SemanticSegmenter``: an smp architecture and encoder as a LightningModule."""

from __future__ import annotations

from typing import Any, Optional

import segmentation_models_pytorch as smp
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_gf.app.models.checkpoint import load_weights
from lightning_gf.app.models.optim import check_optimizer_args
from lightning_gf.app.models.task_module import TaskModule

ARCHITECTURES = ("DeepLabV3", "DeepLabV3Plus", "UPerNet", "PSPNet", "FPN", "Unet")
IGNORE_INDEX = 255


class SemanticSegmenter(TaskModule):
    """Semantic segmentation with segmentation-models-pytorch, by architecture and encoder name.

    Args:
        arch: one of ``DeepLabV3``, ``DeepLabV3Plus``, ``UPerNet``, ``PSPNet``, ``FPN``, ``Unet``.
        encoder_name: an smp encoder, e.g. ``'resnet18'``, ``'mobilenet_v2'``.
        num_classes: output classes; pixels labelled 255 are ignored by loss and metric.
        pretrained: let smp fetch ImageNet encoder weights (needs the network).
        checkpoint_path: local weights (an smp model ``state_dict`` or a checkpoint of this
            module); tensors of another shape (the head) are left re-initialised.
        optimizer, lr, momentum, weight_decay, warmup_ratio: as :class:`ImageClassifier`.
        model_kwargs: more keyword arguments for ``smp.create_model``.

    Logs ``train/loss``, ``val/loss``, ``val/miou`` (torchmetrics mean IoU over classes).

    Example:
        >>> import torch
        >>> m = SemanticSegmenter("FPN", "resnet18", num_classes=3)
        >>> m(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(
        self,
        arch: str = "DeepLabV3",
        encoder_name: str = "resnet18",
        num_classes: int = 21,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0005,
        warmup_ratio: float = 0.0,
        model_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_optimizer_args(optimizer, lr, warmup_ratio)
        by_lower = {a.lower(): a for a in ARCHITECTURES}
        if arch.lower() not in by_lower:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.save_hyperparameters()
        self.model = smp.create_model(
            by_lower[arch.lower()], encoder_name=encoder_name, encoder_weights="imagenet" if pretrained else None,
            classes=num_classes, **(model_kwargs or {}),
        )
        if checkpoint_path:
            load_weights(self.model, checkpoint_path)
        self.val_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
        self.test_miou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, masks = batch
        loss = F.cross_entropy(self(images), masks, ignore_index=IGNORE_INDEX)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(masks))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, masks = batch
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX), batch_size=len(masks))
        metric = self.val_miou if stage == "val" else self.test_miou
        metric(logits.argmax(1), masks)
        self.log(f"{stage}/miou", metric, prog_bar=True, batch_size=len(masks))
