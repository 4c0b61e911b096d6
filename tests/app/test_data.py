"""The data modules, on data generated here (no download)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_gf.app.data import (
    CIFARDataModule,
    CityscapesSegmentationDataModule,
    ImageFolderDataModule,
    ShapesDataModule,
    VOCSegmentationDataModule,
)
from lightning_gf.app.data.base import IMAGENET_MEAN, IMAGENET_STD
from lightning_gf.app.data.partition import two_partition_split
from lightning_gf.app.data.shapes import NUM_SHAPES, generate_shapes


def _unnormalize(images: torch.Tensor) -> torch.Tensor:
    return images * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


# --- generated shapes -------------------------------------------------------------------


def test_shapes_are_deterministic_and_subsets_differ() -> None:
    a = generate_shapes(8, image_size=32, seed=3)
    b = generate_shapes(8, image_size=32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, generate_shapes(8, image_size=32, seed=4).images)
    assert not torch.equal(a.images, generate_shapes(8, image_size=32, seed=3, subset="val").images)


def test_classification_masks_hold_exactly_the_labelled_shape() -> None:
    s = generate_shapes(64, image_size=48, max_shapes=1)
    for mask, label in zip(s.masks, s.labels):
        values = set(torch.unique(mask).tolist())
        assert values == {0, int(label) + 1}  # background and the one shape, visible
    assert set(s.labels.tolist()) == set(range(NUM_SHAPES))


def test_finetune_split_is_shifted() -> None:
    pre = generate_shapes(512, split="pretrain", image_size=32)
    fine = generate_shapes(512, split="finetune", image_size=32)
    # darker images, smaller shapes, skewed class frequencies
    assert fine.images.float().mean() < pre.images.float().mean() - 5
    assert (fine.masks > 0).float().mean() < (pre.masks > 0).float().mean()
    pre_counts = torch.bincount(pre.labels, minlength=NUM_SHAPES)
    fine_counts = torch.bincount(fine.labels, minlength=NUM_SHAPES)
    assert fine_counts[0] > 2 * fine_counts[-1] and pre_counts.max() < 2 * pre_counts.min()


def test_shapes_segmentation_batches() -> None:
    dm = ShapesDataModule(task="segmentation", image_size=32, train_size=300, val_size=4, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) == 300  # spans two generation chunks
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32) and masks.dtype == torch.long
    assert 0 < int(masks.max()) <= NUM_SHAPES and dm.num_classes == NUM_SHAPES + 1
    assert torch.allclose(_unnormalize(images).clamp(0, 1), _unnormalize(images), atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"task": "detection"}, {"split": "test"}, {"batch_size": 0}])
def test_shapes_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ShapesDataModule(**kwargs)


# --- the paper's two partitions -------------------------------------------------------


def test_two_partition_split_is_disjoint_skewed_and_seeded() -> None:
    labels = [c for c in range(10) for _ in range(100)]
    pre, fine = two_partition_split(labels, alpha=0.1, seed=0)
    assert not set(pre) & set(fine) and sorted(pre + fine) == list(range(1000))
    share = np.bincount(np.asarray(labels)[pre], minlength=10) / 100
    assert (share < 0.2).sum() + (share > 0.8).sum() >= 5  # alpha=0.1: most classes mostly on one side
    assert two_partition_split(labels, alpha=0.1, seed=0) == (pre, fine)
    assert two_partition_split(labels, alpha=0.1, seed=1) != (pre, fine)
    with pytest.raises(ValueError, match="alpha"):
        two_partition_split(labels, alpha=0)


# --- CIFAR ----------------------------------------------------------------------------


def _fake_cifar10(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10 for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar10(tmp_path)
    # our files, not the real ones: skip torchvision's md5 checks
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    sizes = {}
    for partition in ("pretrain", "finetune", "all"):
        dm = CIFARDataModule(root=str(tmp_path), partition=partition, image_size=40, batch_size=5, num_workers=0)
        dm.setup("fit")
        sizes[partition] = len(dm.train_set)
        images, labels = next(iter(dm.train_dataloader()))
        assert images.shape == (5, 3, 40, 40) and labels.max() < 10
    assert sizes["pretrain"] + sizes["finetune"] == sizes["all"] == 100
    assert 0 < sizes["pretrain"] < 100
    assert len(dm.val_set) == 20 and dm.num_classes == 10


def test_cifar_missing_says_how_to_download(tmp_path: Path) -> None:
    dm = CIFARDataModule(root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(RuntimeError, match="download=True"):
        dm.setup("fit")


# --- ImageFolder ----------------------------------------------------------------------


def _write_image(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog", "eel")):
            for i in range(2):
                _write_image(tmp_path / split / cls / f"{i}.png", (40, 30), 80 * c)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=24, batch_size=6, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "eel"]
    dm.setup("fit")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (6, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1, 2, 2]
    # the grey value of each class survives loading and normalisation
    assert _unnormalize(images)[:, 0].mean((1, 2)).mul(255).round().tolist() == [0, 0, 80, 80, 160, 160]
    with pytest.raises(FileNotFoundError, match="expected"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere")).num_classes


# --- segmentation folders -------------------------------------------------------------


def _write_mask(path: Path, mask: np.ndarray, palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, (3 * i) % 256, (7 * i) % 256)])
        im.putdata(mask.flatten().tolist())
    im.save(path)


def _stripes(h: int, w: int, values: list[int]) -> np.ndarray:
    mask = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        mask[:, i * w // len(values) : (i + 1) * w // len(values)] = v
    return mask


def test_voc_layout(tmp_path: Path) -> None:
    ids = ["2007_000001", "2007_000002"]
    for i in ids:
        _write_image(tmp_path / "JPEGImages" / f"{i}.jpg", (64, 48), 100)
        _write_mask(tmp_path / "SegmentationClass" / f"{i}.png", _stripes(48, 64, [0, 15, 255, 20]), palette=True)
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    dm = VOCSegmentationDataModule(root=str(tmp_path), image_size=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32)
    assert masks[0, 0].tolist() == [0] * 8 + [15] * 8 + [255] * 8 + [20] * 8  # palette indices, nearest resize
    train_images, train_masks = next(iter(dm.train_dataloader()))
    assert train_images.shape == (2, 3, 32, 32)
    assert set(torch.unique(train_masks).tolist()) <= {0, 15, 20, 255}
    assert dm.num_classes == 21
    (tmp_path / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        VOCSegmentationDataModule(root=str(tmp_path), num_workers=0).setup("fit")


def test_cityscapes_layout_maps_label_ids(tmp_path: Path) -> None:
    for split in ("train", "val"):
        base = f"aachen_000000_00001{'9' if split == 'val' else '0'}"
        _write_image(tmp_path / "leftImg8bit" / split / "aachen" / f"{base}_leftImg8bit.png", (64, 32), 50)
        _write_mask(tmp_path / "gtFine" / split / "aachen" / f"{base}_gtFine_labelIds.png",
                    _stripes(32, 64, [7, 26, 0, 33]), palette=False)
    dm = CityscapesSegmentationDataModule(root=str(tmp_path), image_size=16, batch_size=1, num_workers=0)
    dm.setup("fit")
    _, masks = next(iter(dm.val_dataloader()))
    assert masks[0, 0].tolist() == [0] * 4 + [13] * 4 + [255] * 4 + [18] * 4  # road, car, void, bicycle
    assert len(dm.train_set) == 1 and dm.num_classes == 19
    with pytest.raises(FileNotFoundError, match="Cityscapes"):
        CityscapesSegmentationDataModule(root=str(tmp_path / "x"), num_workers=0).setup("fit")
