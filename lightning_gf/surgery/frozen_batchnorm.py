"""The behaviour a BatchNorm layer takes on under ``bn_eval=True``: it never leaves eval mode."""

from __future__ import annotations

from lightning_gf.surgery.class_swap import Swappable


class EvalModeMixin(Swappable):
    """Mixed into a BatchNorm instance: ``train(True)`` leaves it in eval mode.

    Running statistics stay frozen; the affine parameters still learn when they
    require grad (the paper's fine-tuning setting).
    """

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        return super().train(False)  # type: ignore[misc]
