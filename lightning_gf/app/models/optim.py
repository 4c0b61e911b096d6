"""Optimiser and schedule shared by the task modules: SGD or AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear from ~0 to 1 over ``warmup_steps``, then cosine to 0.

    Example:
        >>> [round(warmup_cosine(s, 10, 2), 3) for s in (0, 1, 2, 6, 10)]
        [0.333, 0.667, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def check_optimizer_args(optimizer: str, lr: float, warmup_ratio: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")


def build_optimizer(
    parameters: Iterable[nn.Parameter], *, optimizer: str, lr: float, weight_decay: float, momentum: float,
    warmup_ratio: float, total_steps: int,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` dict for the parameters that still train.

    The schedule steps every optimiser step; ``warmup_ratio`` of ``total_steps`` warm up.
    """
    trainable = [p for p in parameters if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires grad: nothing to train (check freeze settings and depth)")
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    total = max(1, int(total_steps))
    warmup = int(warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
