"""Data of the accuracy benchmark, as in-memory tensors: the generated textured objects
(``benchmarks.textured_objects``, the default), the embedded shapes, or CIFAR.

All sources follow the paper's protocol: a ``pretrain`` partition to pretrain the
whole network, and a different ``finetune`` partition (shifted) to fine-tune its last
layers and to score it. Images come normalised (ImageNet mean and std), labels int64.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.textured_objects import NUM_CLASSES as NUM_OBJECT_CLASSES
from benchmarks.textured_objects import generate_textured_objects
from lightning_gf.app.data.base import normalize
from lightning_gf.app.data.shapes import NUM_SHAPES
from lightning_gf.app.data.shapes_module import ShapesDataset

SOURCES = ("objects", "shapes", "cifar10", "cifar100")


@dataclass(frozen=True)
class Tensors:
    """``images`` float ``(N, 3, H, W)`` (normalised) and ``labels`` int64 ``(N,)``."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSource:
    """Where the benchmark's images come from.

    Example:
        >>> src = DataSource("objects", image_size=32)
        >>> src.num_classes, len(src.finetune_set("train", 4, seed=0))
        (16, 4)
    """

    name: str = "objects"
    image_size: int = 112
    root: str = "data/cifar"

    def __post_init__(self) -> None:
        if self.name not in SOURCES:
            raise ValueError(f"data source must be one of {SOURCES}, got {self.name!r}")

    @property
    def num_classes(self) -> int:
        return {"objects": NUM_OBJECT_CLASSES, "shapes": NUM_SHAPES, "cifar10": 10, "cifar100": 100}[self.name]

    def pretrain_batches(self, steps: int, batch_size: int, seed: int, image_size: int = 0) -> Iterator[Tensors]:
        """``steps`` training batches of the pretraining partition (objects, shapes: all distinct
        images), ``image_size`` px (default: the source's)."""
        size = image_size or self.image_size
        if self.name == "objects":
            for step in range(steps):
                drawn = generate_textured_objects(batch_size, split="pretrain", subset="train", image_size=size,
                                                  seed=seed, start=step * batch_size)
                yield Tensors(normalize(drawn.images), drawn.labels)
            return
        if self.name == "shapes":
            ds = ShapesDataset("classification", "pretrain", "train", steps * batch_size, size, seed=seed)
            for step in range(steps):
                batch = slice(step * batch_size, (step + 1) * batch_size)
                yield Tensors(normalize(ds.images[batch]), ds.labels[batch])
            return
        loader = torch.utils.data.DataLoader(self._cifar("pretrain", seed).train_set, batch_size=batch_size,
                                             shuffle=True, drop_last=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        step = 0
        while step < steps:
            for images, labels in loader:
                if size != images.shape[-1]:
                    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                             antialias=True, align_corners=False)
                yield Tensors(images, labels)
                step += 1
                if step == steps:
                    return

    def pretrain_val(self, size: int) -> Tensors:
        """Held-out images of the pretraining partition (objects, shapes) or the test set (CIFAR)."""
        if self.name == "objects":
            return self._objects("pretrain", "val", size, seed=0)
        if self.name == "shapes":
            return self._shapes("pretrain", "val", size, seed=0)
        return self._materialise(self._cifar("finetune", 0).val_set, size, seed=0)

    def finetune_set(self, subset: str, size: int, seed: int) -> Tensors:
        """``size`` images of the fine-tuning partition: ``subset`` ``'train'`` or ``'val'``
        (CIFAR: the test set). ``size <= 0`` takes all (CIFAR)."""
        if self.name == "objects":
            return self._objects("finetune", subset, size, seed)
        if self.name == "shapes":
            return self._shapes("finetune", subset, size, seed)
        dm = self._cifar("finetune", 0)
        dataset = dm.train_set if subset == "train" else dm.val_set
        return self._materialise(dataset, size, seed)

    def _objects(self, split: str, subset: str, size: int, seed: int) -> Tensors:
        drawn = generate_textured_objects(size, split=split, subset=subset, image_size=self.image_size, seed=seed)
        return Tensors(normalize(drawn.images), drawn.labels)

    def _shapes(self, split: str, subset: str, size: int, seed: int) -> Tensors:
        ds = ShapesDataset("classification", split, subset, size, self.image_size, seed=seed)
        return Tensors(normalize(ds.images), ds.labels)

    def _cifar(self, partition: str, seed: int):  # type: ignore[no-untyped-def]
        from lightning_gf.app.data.cifar import CIFARDataModule

        dm = CIFARDataModule(root=self.root, variant=self.name, partition=partition, image_size=self.image_size,
                             seed=seed, num_workers=2)
        dm.setup("fit")
        return dm

    @staticmethod
    def _materialise(dataset, size: int, seed: int) -> Tensors:  # type: ignore[no-untyped-def]
        """The first ``size`` items of a shuffled dataset (one draw of its random transform)."""
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        if size > 0:
            order = order[:size]
        items = [dataset[int(i)] for i in order]
        return Tensors(torch.stack([im for im, _ in items]), torch.tensor([int(lab) for _, lab in items]))
