"""Keep the running statistics of eval-mode BatchNorm layers when something swaps them out.

Under ``bn_eval=True`` the BatchNorm statistics are frozen. Lightning's
``StochasticWeightAveraging`` replaces them with zeros/ones before its BatchNorm
re-estimation epoch, which cannot re-estimate anything in eval mode; this puts the
frozen statistics back.
"""

from __future__ import annotations

from torch import Tensor, nn


class FrozenBatchNormStats:
    """The running-statistic tensors of some BatchNorm layers, and a way to put them back.

    Example:
        >>> import torch
        >>> bn = nn.BatchNorm2d(2)
        >>> kept = FrozenBatchNormStats([bn])
        >>> bn.running_mean = torch.zeros(2) + 5
        >>> kept.restore_replaced(), bn.running_mean.tolist()
        (1, [0.0, 0.0])
    """

    def __init__(self, batchnorms: list[nn.Module]) -> None:
        self._kept: dict[nn.Module, tuple[Tensor, Tensor, int]] = {
            bn: (bn.running_mean, bn.running_var, int(bn.num_batches_tracked))  # type: ignore[arg-type]
            for bn in batchnorms
            if bn.running_mean is not None
        }

    def restore_replaced(self) -> int:
        """Put back statistics tensors that were replaced; how many layers were restored."""
        restored = 0
        for bn, (mean, var, tracked) in self._kept.items():
            if bn.running_mean is not mean or bn.running_var is not var:
                bn.running_mean, bn.running_var = mean, var
                bn.num_batches_tracked.fill_(tracked)  # type: ignore[union-attr]
                restored += 1
        return restored
