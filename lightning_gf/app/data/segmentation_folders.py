"""Segmentation from folders in the Pascal VOC and Cityscapes layouts.

- VOC: ``root/JPEGImages/<id>.jpg``, ``root/SegmentationClass/<id>.png`` (palette PNG
  of class indices, 255 = ignore), ``root/ImageSets/Segmentation/<split>.txt``
  (one id per line). 21 classes.
- Cityscapes: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
  ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``; label ids are mapped
  to the 19 training ids (others to 255). 19 classes.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lightning_gf.app.data.base import IGNORE_INDEX, ImageDataModule, normalize

# Cityscapes label id -> training id (the 19 evaluated classes); all other ids -> 255
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_label_map() -> Tensor:
    """A 256-entry lookup table from Cityscapes label ids to training ids.

    Example:
        >>> cityscapes_label_map()[torch.tensor([7, 26, 0])].tolist()
        [0, 13, 255]
    """
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        table[label_id] = train_id
    return table


def _resize_pair(image: Tensor, mask: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


class SegmentationPairs(Dataset):
    """(image, mask) files -> ``(normalised image (3, S, S), mask (S, S) int64)``.

    Training: random scale in [0.5, 2] of ``image_size``, random ``image_size`` crop
    (padding: image 0, mask 255), horizontal flip. Evaluation: resize to ``image_size``.
    """

    def __init__(
        self, pairs: list[tuple[str, str]], image_size: int, train: bool, label_map: Optional[Tensor] = None
    ) -> None:
        if not pairs:
            raise ValueError("no (image, mask) pairs found: check root and the folder layout")
        self.pairs, self.image_size, self.train, self.label_map = pairs, image_size, train, label_map

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
        with Image.open(mask_path) as m:  # palette or grey PNG: the pixel values are the labels
            mask = torch.from_numpy(np.array(m)).long()
        if mask.dim() != 2:
            raise ValueError(f"{mask_path}: mask must be a single-channel (palette or grey) PNG")
        if self.label_map is not None:
            mask = self.label_map[mask]
        return normalize(image), mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self._load(index)
        size = self.image_size
        if not self.train:
            return _resize_pair(image, mask, (size, size))
        scale = float(torch.empty(()).uniform_(0.5, 2.0)) * size / min(image.shape[1:])
        h, w = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))
        image, mask = _resize_pair(image, mask, (h, w))
        pad_h, pad_w = max(0, size - h), max(0, size - w)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[1] - size + 1, ()))
        left = int(torch.randint(0, image.shape[2] - size + 1, ()))
        image, mask = image[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


class _SegmentationFolderModule(ImageDataModule):
    num_classes: int
    label_map: Optional[Tensor] = None

    def __init__(self, root: str, train_split: str, val_split: str, image_size: int, batch_size: int,
                 num_workers: int) -> None:
        super().__init__(batch_size, num_workers)
        self.root, self.image_size = root, image_size
        self.splits = {"train": train_split, "val": val_split}

    def pairs(self, split: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = SegmentationPairs(self.pairs(self.splits["train"]), self.image_size, True, self.label_map)
        if self.val_set is None:
            self.val_set = SegmentationPairs(self.pairs(self.splits["val"]), self.image_size, False, self.label_map)


class VOCSegmentationDataModule(_SegmentationFolderModule):
    """Pascal VOC layout (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation``).

    Example:
        >>> VOCSegmentationDataModule(root="data/VOC2012").num_classes
        21
    """

    num_classes = 21

    def __init__(self, root: str = "data/VOCdevkit/VOC2012", train_split: str = "train", val_split: str = "val",
                 image_size: int = 512, batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__(root, train_split, val_split, image_size, batch_size, num_workers)
        self.save_hyperparameters()

    def pairs(self, split: str) -> list[tuple[str, str]]:
        list_file = os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"no {list_file!r}: root must be a VOC folder (JPEGImages, SegmentationClass, ImageSets)")
        with open(list_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        pairs = [(os.path.join(self.root, "JPEGImages", f"{i}.jpg"),
                  os.path.join(self.root, "SegmentationClass", f"{i}.png")) for i in ids]
        missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files listed in {list_file} are missing, e.g. {missing[0]}")
        return pairs


class CityscapesSegmentationDataModule(_SegmentationFolderModule):
    """Cityscapes layout (``leftImg8bit/<split>/<city>``, ``gtFine/<split>/<city>``), 19 classes.

    Example:
        >>> CityscapesSegmentationDataModule(root="data/cityscapes").num_classes
        19
    """

    num_classes = 19
    label_map = cityscapes_label_map()

    def __init__(self, root: str = "data/cityscapes", train_split: str = "train", val_split: str = "val",
                 image_size: int = 512, batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__(root, train_split, val_split, image_size, batch_size, num_workers)
        self.save_hyperparameters()

    def pairs(self, split: str) -> list[tuple[str, str]]:
        pattern = os.path.join(self.root, "leftImg8bit", split, "*", "*_leftImg8bit.png")
        images = sorted(glob.glob(pattern))
        if not images:
            raise FileNotFoundError(f"no images match {pattern!r}: root must be a Cityscapes folder")
        pairs = []
        for image in images:
            mask = image.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep, 1)
            mask = mask[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
            if not os.path.isfile(mask):
                raise FileNotFoundError(f"no mask {mask!r} for {image!r}")
            pairs.append((image, mask))
        return pairs
