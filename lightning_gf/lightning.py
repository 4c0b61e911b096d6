"""``from lightning_gf.lightning import GradientFilterCallback``: the callback for ``lightning.pytorch``
(:mod:`lightning_gf.callbacks.lightning`)."""

from lightning_gf.callbacks.lightning import GradientFilterCallback

__all__ = ["GradientFilterCallback"]
