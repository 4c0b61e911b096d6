"""lightning-gf: gradient filtering (Yang et al., CVPR 2023) for PyTorch and Lightning.

Example:
    >>> import torch
    >>> import lightning_gf
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1))
    >>> handle = lightning_gf.apply_gradient_filter(net, r=2, depth=1, example_input=torch.zeros(1, 3, 8, 8))
    >>> handle.remove()
"""

from __future__ import annotations

from typing import Any

from lightning_gf.ops.conv import filtered_conv2d
from lightning_gf.ops.stats import FilterStats
from lightning_gf.surgery.apply import apply_gradient_filter
from lightning_gf.surgery.handle import FilteredLayer, GradientFilterHandle

__version__ = "0.1.0"

__all__ = [
    "FilterStats",
    "FilteredLayer",
    "GradientFilterCallback",
    "GradientFilterHandle",
    "apply_gradient_filter",
    "filtered_conv2d",
]


def __getattr__(name: str) -> Any:
    # The callback imports pytorch_lightning, which is slow: load it on first use.
    if name == "GradientFilterCallback":
        from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback

        return GradientFilterCallback
    raise AttributeError(f"module 'lightning_gf' has no attribute {name!r}")
