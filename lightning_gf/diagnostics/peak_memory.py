"""The peak device memory of one training step, on CUDA: ``gf/peak_mb``.

``reset_step_peak`` at the start of a step, ``step_peak_mib`` at its end: the largest
``torch.cuda.max_memory_allocated`` in between, in MiB (2^20 bytes). Both do nothing
(and the latter returns ``None``) for a module that is not on a CUDA device.

Example:
    >>> reset_step_peak(torch.device("cpu"))
    False
    >>> step_peak_mib(torch.device("cpu")) is None
    True
"""

from __future__ import annotations

from typing import Optional

import torch

_MIB = 2**20


def on_cuda(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device this process can use."""
    return device.type == "cuda" and torch.cuda.is_available()


def reset_step_peak(device: torch.device) -> bool:
    """Start measuring a step's peak on ``device``; returns whether it is measured."""
    if not on_cuda(device):
        return False
    torch.cuda.reset_peak_memory_stats(device)
    return True


def step_peak_mib(device: torch.device) -> Optional[float]:
    """The peak allocated memory on ``device`` since :func:`reset_step_peak`, in MiB; None off CUDA."""
    if not on_cuda(device):
        return None
    return torch.cuda.max_memory_allocated(device) / _MIB
