"""``GradientFilterCallback`` for ``pytorch_lightning.Trainer``.

For ``lightning.pytorch.Trainer`` use :mod:`lightning_gf.callbacks.lightning`.
"""

from __future__ import annotations

import pytorch_lightning as pl

from lightning_gf.callbacks.base import GradientFilterCallbackBase


class GradientFilterCallback(GradientFilterCallbackBase, pl.Callback):
    __doc__ = GradientFilterCallbackBase.__doc__
