"""``from lightning_gf.callback import GradientFilterCallback``: the callback for ``pytorch_lightning``
(:mod:`lightning_gf.callbacks.pytorch_lightning`)."""

from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback

__all__ = ["GradientFilterCallback"]
