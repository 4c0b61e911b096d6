"""``ImageFolderDataModule``: classification from ``root/<split>/<class>/<image>`` folders."""

from __future__ import annotations

import os
from typing import Optional

from torchvision import datasets, transforms

from lightning_gf.app.data.base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule


class ImageFolderDataModule(ImageDataModule):
    """Images in ``root/train/<class>/*``, ``root/val/<class>/*`` (and optionally ``root/test``).

    Training: random resized crop and flip; evaluation: resize to ``image_size * 8/7``
    and centre crop.

    Example:
        >>> dm = ImageFolderDataModule(root="data/flowers", image_size=224)
        >>> dm.image_size
        224
    """

    def __init__(
        self,
        root: str = "data/images",
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: Optional[str] = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.root, self.image_size = root, image_size
        self.dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self._classes: Optional[list[str]] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def classes(self) -> list[str]:
        if self._classes is None:
            self._classes = sorted(e.name for e in os.scandir(self._path("train")) if e.is_dir())
        return self._classes

    def _path(self, subset: str) -> str:
        path = os.path.join(self.root, self.dirs[subset] or "")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{type(self).__name__}: no folder {path!r}; expected {self.root}/<split>/<class>/<image> "
                f"(set root, train_dir, val_dir)"
            )
        return path

    def _folder(self, subset: str, train: bool) -> datasets.ImageFolder:
        if train:
            tf = [transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            tf = [transforms.Resize(self.image_size * 8 // 7), transforms.CenterCrop(self.image_size)]
        tf += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        folder = datasets.ImageFolder(self._path(subset), transform=transforms.Compose(tf))
        if folder.classes != self.classes:
            raise ValueError(f"{self._path(subset)!r} has classes {folder.classes}, the training folder {self.classes}")
        return folder

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._folder("train", train=True)
        if self.val_set is None:
            self.val_set = self._folder("val", train=False)
        if stage in (None, "test") and self.dirs["test"] and self.test_set is None:
            self.test_set = self._folder("test", train=False)
