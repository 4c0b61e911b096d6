"""``CIFARDataModule``: CIFAR-10/100 through torchvision, with the paper's two partitions."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import Subset
from torchvision import datasets, transforms

from lightning_gf.app.data.base import IMAGENET_MEAN, IMAGENET_STD, ImageDataModule
from lightning_gf.app.data.partition import two_partition_split

VARIANTS = {"cifar10": (datasets.CIFAR10, 10), "cifar100": (datasets.CIFAR100, 100)}
PARTITIONS = ("pretrain", "finetune", "all")


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 from ``root`` (torchvision layout).

    Training uses one partition of the training set (:func:`two_partition_split`,
    ``partition='finetune'`` by default, ``'all'`` for the whole set); validation and
    test use the whole CIFAR test set. ``download=True`` fetches the archive into
    ``root`` (the only network access of the package).

    Example:
        >>> dm = CIFARDataModule(root="data/cifar10", variant="cifar10", download=False)
        >>> dm.num_classes
        10
    """

    def __init__(
        self,
        root: str = "data/cifar",
        variant: str = "cifar10",
        download: bool = False,
        partition: str = "finetune",
        alpha: float = 0.5,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
        self.save_hyperparameters()
        self.root, self.variant, self.download = root, variant, download
        self.partition, self.alpha, self.image_size, self.seed = partition, alpha, image_size, seed

    @property
    def num_classes(self) -> int:
        return VARIANTS[self.variant][1]

    def _transform(self, train: bool) -> transforms.Compose:
        steps: list = [] if self.image_size == 32 else [transforms.Resize(self.image_size)]
        if train:
            steps += [transforms.RandomCrop(self.image_size, padding=self.image_size // 8),
                      transforms.RandomHorizontalFlip()]
        steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        return transforms.Compose(steps)

    def _open(self, train: bool) -> datasets.VisionDataset:
        cls = VARIANTS[self.variant][0]
        try:
            return cls(self.root, train=train, download=self.download, transform=self._transform(train))
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.variant} not found under {self.root!r}: set download=True "
                f"(--data.download=true) or point root at an extracted copy ({err})"
            ) from err

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                VARIANTS[self.variant][0](self.root, train=train, download=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            full = self._open(train=True)
            if self.partition == "all":
                self.train_set = full
            else:
                pretrain, finetune = two_partition_split(full.targets, self.alpha, self.seed)  # type: ignore[attr-defined]
                self.train_set = Subset(full, pretrain if self.partition == "pretrain" else finetune)
        if self.val_set is None:
            self.val_set = self._open(train=False)
