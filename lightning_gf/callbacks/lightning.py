"""``GradientFilterCallback`` for ``lightning.pytorch.Trainer`` (the ``lightning`` package).

Example:
    >>> from lightning_gf.callbacks.lightning import GradientFilterCallback
    >>> import lightning.pytorch as L
    >>> isinstance(GradientFilterCallback(r=2, depth=3), L.Callback)
    True
"""

from __future__ import annotations

import lightning.pytorch as L

from lightning_gf.callbacks.base import GradientFilterCallbackBase


class GradientFilterCallback(GradientFilterCallbackBase, L.Callback):
    __doc__ = GradientFilterCallbackBase.__doc__
