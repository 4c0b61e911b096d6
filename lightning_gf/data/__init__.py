"""Data modules: the embedded generated shapes, CIFAR, ImageFolder, VOC and Cityscapes folders."""

from lightning_gf.data.cifar import CIFARDataModule
from lightning_gf.data.image_folder import ImageFolderDataModule
from lightning_gf.data.segmentation_folders import CityscapesSegmentationDataModule, VOCSegmentationDataModule
from lightning_gf.data.shapes_module import ShapesDataModule

__all__ = [
    "CIFARDataModule",
    "CityscapesSegmentationDataModule",
    "ImageFolderDataModule",
    "ShapesDataModule",
    "VOCSegmentationDataModule",
]
