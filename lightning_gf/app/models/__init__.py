"""LightningModules for the recipes: a timm classifier and an smp segmenter."""

from lightning_gf.app.models.classifier import ImageClassifier
from lightning_gf.app.models.segmenter import SemanticSegmenter

__all__ = ["ImageClassifier", "SemanticSegmenter"]
