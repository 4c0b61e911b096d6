"""Measure what autograd keeps for backward during a forward, in total and per layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn


def _storage_key(t: Tensor) -> Optional[tuple[int, int]]:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta, wrappers)
        return None


class SavedTensorMeter:
    """Records the storages that autograd saves for backward while the block runs.

    A storage counts once however many ops save it (a ReLU and the conv after it
    save the same tensor); parameters never count (they are kept anyway). A tensor
    saved while one of ``layers`` runs its forward is also counted for that layer.

    Attributes after the block:
        total_bytes: bytes of all distinct saved storages.
        layer_bytes: ``{layer name: bytes}`` of the storages each layer saved.

    Example:
        >>> conv = nn.Conv2d(2, 3, 1)
        >>> x = torch.randn(1, 2, 4, 4, requires_grad=True)
        >>> with SavedTensorMeter([("conv", conv)]) as meter:
        ...     y = conv(x)
        >>> meter.layer_bytes["conv"] == x.numel() * 4  # the input; the weight does not count
        True
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]] = ()) -> None:
        self._layers = list(layers)
        self._current: list[str] = []
        self._all: dict[tuple[int, int], int] = {}
        self._per_layer: dict[str, dict[tuple[int, int], int]] = {name: {} for name, _ in self._layers}
        self._skip: set[tuple[int, int]] = set()
        self._hooks: list[Any] = []
        self._saved_hooks: Optional[torch.autograd.graph.saved_tensors_hooks] = None

    @property
    def total_bytes(self) -> int:
        return sum(self._all.values())

    @property
    def layer_bytes(self) -> dict[str, int]:
        return {name: sum(keys.values()) for name, keys in self._per_layer.items()}

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is not None and key not in self._skip:
            self._all[key] = key[1]
            if self._current:
                self._per_layer[self._current[-1]][key] = key[1]
        # A detached view, not ``t`` itself: handing autograd back the very tensors it saves
        # (measured with the filter's autograd Functions in the graph) left a forward that is
        # never backpropagated with a graph that no garbage collection frees.
        return t.detach()

    def _enter_layer(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._current.append(name)

        return hook

    def _leave_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        self._current.pop()

    def __enter__(self) -> "SavedTensorMeter":
        for name, module in self._layers:
            self._skip.update(k for p in module.parameters() if (k := _storage_key(p)) is not None)
            self._hooks.append(module.register_forward_pre_hook(self._enter_layer(name)))
            self._hooks.append(module.register_forward_hook(self._leave_layer))
        self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved_hooks.__enter__()
        return self

    def skip_parameters_of(self, model: nn.Module, *, buffers: bool = False) -> None:
        """Do not count the parameters of ``model`` (and its buffers, with ``buffers=True``;
        call before the forward)."""
        tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
        self._skip.update(k for t in tensors if (k := _storage_key(t)) is not None)

    def __exit__(self, *exc: Any) -> None:
        if self._saved_hooks is not None:
            self._saved_hooks.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
