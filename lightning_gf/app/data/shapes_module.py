"""``ShapesDataModule``: the embedded, generated dataset (see :mod:`lightning_gf.app.data.shapes`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_gf.app.data.base import ImageDataModule, normalize
from lightning_gf.app.data.shapes import NUM_SHAPES, SPLITS, generate_shapes

TASKS = ("classification", "segmentation")
_CHUNK = 256


class ShapesDataset(Dataset):
    """``size`` generated samples, drawn once (in chunks) and kept in memory as uint8.

    Classification items are ``(image, label)``; segmentation items ``(image, mask)``
    with ``mask`` int64, 0 = background, ``k + 1`` = shape class ``k``.

    Example:
        >>> ds = ShapesDataset(task="segmentation", size=3, image_size=32)
        >>> image, mask = ds[0]
        >>> tuple(image.shape), tuple(mask.shape), mask.dtype
        ((3, 32, 32), (32, 32), torch.int64)
    """

    def __init__(
        self, task: str = "classification", split: str = "finetune", subset: str = "train",
        size: int = 256, image_size: int = 64, seed: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.task = task
        max_shapes = 1 if task == "classification" else 3
        chunks = [
            generate_shapes(min(_CHUNK, size - start), split=split, subset=subset, image_size=image_size,
                            seed=seed, start=start, max_shapes=max_shapes)
            for start in range(0, size, _CHUNK)
        ]
        self.images = torch.cat([c.images for c in chunks])
        self.masks = torch.cat([c.masks for c in chunks])
        self.labels = torch.cat([c.labels for c in chunks])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = normalize(self.images[index])
        if self.task == "classification":
            return image, self.labels[index]
        return image, self.masks[index].long()


class ShapesDataModule(ImageDataModule):
    """Generated textured shapes for classification or segmentation; nothing to download.

    ``split='pretrain'`` and ``split='finetune'`` are the two partitions of the paper's
    on-device protocol (same classes, shifted appearance and class frequencies).

    Args:
        task: ``'classification'`` (8 classes) or ``'segmentation'`` (9 classes with background).
        split: ``'pretrain'`` or ``'finetune'``.
        image_size: side of the square images.
        train_size, val_size, test_size: number of samples of each subset.
        seed: changes every image.

    Example:
        >>> dm = ShapesDataModule(image_size=32, train_size=8, val_size=4, test_size=4, batch_size=4)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), dm.num_classes
        ((4, 3, 32, 32), 8)
    """

    def __init__(
        self,
        task: str = "classification",
        split: str = "finetune",
        image_size: int = 64,
        train_size: int = 1024,
        val_size: int = 256,
        test_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.save_hyperparameters()
        self.task, self.split, self.image_size, self.seed = task, split, image_size, seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    @property
    def num_classes(self) -> int:
        return NUM_SHAPES if self.task == "classification" else NUM_SHAPES + 1

    def _dataset(self, subset: str) -> ShapesDataset:
        return ShapesDataset(self.task, self.split, subset, self.sizes[subset], self.image_size, self.seed)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train")
        if stage in (None, "fit", "validate", "predict") and self.val_set is None:
            self.val_set = self._dataset("val")
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._dataset("test")
