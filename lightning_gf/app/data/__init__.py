"""Data modules: the embedded generated shapes, CIFAR, ImageFolder, VOC and Cityscapes folders."""

from lightning_gf.app.data.cifar import CIFARDataModule
from lightning_gf.app.data.image_folder import ImageFolderDataModule
from lightning_gf.app.data.segmentation_folders import (
    CityscapesSegmentationDataModule,
    VOCSegmentationDataModule,
)
from lightning_gf.app.data.shapes_module import ShapesDataModule

__all__ = [
    "CIFARDataModule",
    "CityscapesSegmentationDataModule",
    "ImageFolderDataModule",
    "ShapesDataModule",
    "VOCSegmentationDataModule",
]
