"""Run a block on a model and put back everything it may change."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn


@contextmanager
def model_state_kept(model: nn.Module, train: Optional[bool] = None) -> Iterator[None]:
    """Restore train/eval flags, buffers, ``requires_grad``, ``.grad`` and the torch RNG on exit.

    Args:
        model: the model the block may change.
        train: put the model in train (``True``) or eval (``False``) mode for the
            block; ``None`` leaves the mode as it is.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> with model_state_kept(net, train=True):
        ...     _ = net(torch.randn(4, 2))  # updates the BatchNorm running mean
        >>> net[1].running_mean.tolist()
        [0.0, 0.0]
    """
    params = list(model.parameters())
    flags = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    requires_grad = {p: p.requires_grad for p in params}
    grads = {p: p.grad for p in params}
    cuda_devices = sorted({t.device.index or 0 for t in params if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            if train is not None:
                model.train(train)
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, flag in flags.items():
                module.training = flag
            for param, flag in requires_grad.items():
                param.requires_grad_(flag)
            for param, grad in grads.items():
                param.grad = grad


def rng_rewinder(model: nn.Module) -> Callable[[], None]:
    """A function that puts the torch RNG (CPU and the model's GPUs) back to its state now.

    Two passes that each start with a rewind draw the same dropout masks.

    Example:
        >>> rewind = rng_rewinder(nn.Linear(1, 1))
        >>> a = torch.rand(1); rewind(); b = torch.rand(1)
        >>> torch.equal(a, b)
        True
    """
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in cuda_devices]

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        for device, state in zip(cuda_devices, cuda_states):
            torch.cuda.set_rng_state(state, device)

    return rewind
