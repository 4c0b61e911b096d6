"""What :func:`lightning_gf.apply_gradient_filter` did to a model, and how to undo it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from torch import nn

from lightning_gf.ops.stats import FilterStats
from lightning_gf.surgery.class_swap import restore_class


@dataclass(frozen=True)
class FilteredLayer:
    """One filtered conv: its name in the model, the module, its ``r`` and output size."""

    name: str
    module: nn.Conv2d
    r: int
    out_size: tuple[int, ...]


class GradientFilterHandle:
    """The filtered layers of a model, their running stats, and ``remove()``.

    Example:
        >>> import torch
        >>> from lightning_gf import apply_gradient_filter
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1))
        >>> handle = apply_gradient_filter(net, r=2, depth=1, example_input=torch.zeros(1, 3, 8, 8))
        >>> [(layer.name, layer.r) for layer in handle.layers]
        [('1', 2)]
        >>> handle.frozen_parameters
        ['0.weight', '0.bias']
        >>> handle.remove()
        >>> net[0].weight.requires_grad
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[FilteredLayer],
        frozen_parameters: list[str],
        swapped: list[nn.Module],
        eval_batchnorms: list[nn.Module],
        requires_grad: dict[nn.Parameter, bool],
        lean_modules: Optional[list[str]] = None,
    ) -> None:
        self.layers = layers
        self.frozen_parameters = frozen_parameters
        self.lean_modules = lean_modules or []
        self._model = model
        self._swapped = swapped
        self._eval_batchnorms = eval_batchnorms
        self._requires_grad = requires_grad
        self.removed = False

    @property
    def stats(self) -> FilterStats:
        """Totals over all filtered layers since the last :meth:`reset_stats`."""
        total = FilterStats()
        for layer in self.layers:
            total.add(layer.module.gf_stats)  # type: ignore[attr-defined]
        return total

    def reset_stats(self) -> None:
        for layer in self.layers:
            layer.module.gf_stats.reset()  # type: ignore[attr-defined]

    @contextmanager
    def plain(self) -> Iterator[None]:
        """Within the block every patched module computes as plain PyTorch would (``r = 1``).

        Frozen parameters and BatchNorm eval mode stay: this is plain backprop with the
        same trainable set, the baseline the filter is compared against.
        """
        patched = [m for m in self._swapped if "gf_r" in m.__dict__]
        saved = [m.gf_r for m in patched]
        try:
            for m in patched:
                m.gf_r = 1
            yield
        finally:
            for m, r in zip(patched, saved):
                m.gf_r = r

    def remove(self) -> None:
        """Restore plain modules, BatchNorm train/eval behaviour and the ``requires_grad`` flags."""
        if self.removed:
            return
        for module in self._swapped:
            restore_class(module)
            for attr in [a for a in module.__dict__ if a.startswith("gf_")]:
                del module.__dict__[attr]
        for bn in self._eval_batchnorms:
            bn.training = self._model.training
        for param, flag in self._requires_grad.items():
            param.requires_grad_(flag)
        self.removed = True

    def __enter__(self) -> "GradientFilterHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        rows = [f"GradientFilterHandle({len(self.layers)} filtered layers, {len(self.frozen_parameters)} frozen parameters, "
                f"{len(self.lean_modules)} lean modules" + (", removed" if self.removed else "") + ")"]
        for layer in self.layers:
            m = layer.module
            rows.append(
                f"  {layer.name}: r={layer.r} kernel={tuple(m.kernel_size)} stride={tuple(m.stride)} "
                f"groups={m.groups} out={tuple(layer.out_size)}"
            )
        return "\n".join(rows)
