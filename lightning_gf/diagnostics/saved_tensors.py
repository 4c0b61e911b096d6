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


# The meters inside one another. Autograd packs a saved tensor with the innermost
# saved_tensors_hooks only, so every meter shares one pair of hooks: a profiler and the
# callback can then both measure the same training step.
_ACTIVE: list["SavedTensorMeter"] = []
_SHARED_HOOKS: Optional[torch.autograd.graph.saved_tensors_hooks] = None


def _pack(t: Tensor) -> Tensor:
    key = _storage_key(t)
    if key is not None:
        isolated = [m for m in _ACTIVE if m.isolated]
        for meter in isolated[-1:] or _ACTIVE:
            meter._record(key)
    # A detached view, not ``t`` itself: handing autograd back the very tensors it saves
    # (measured with the filter's autograd Functions in the graph) left a forward that is
    # never backpropagated with a graph that no garbage collection frees.
    return t.detach()


def _unpack(t: Tensor) -> Tensor:
    return t


class SavedTensorMeter:
    """Records the storages that autograd saves for backward while the block runs.

    A storage counts once however many ops save it (a ReLU and the conv after it
    save the same tensor); parameters never count (they are kept anyway). A tensor
    saved while one of ``layers`` runs its forward is also counted for that layer.
    Meters may run inside one another and all see the same tensors, except that an
    ``isolated`` meter takes what is saved while it runs for itself alone (a side
    measurement that must not count in an outer meter's step).

    Attributes after the block:
        total_bytes: bytes of all distinct saved storages.
        layer_bytes: ``{layer name: bytes}`` of the storages each layer saved.
        bytes_in_layers: bytes of the distinct storages saved inside any of ``layers``.

    Example:
        >>> conv = nn.Conv2d(2, 3, 1)
        >>> x = torch.randn(1, 2, 4, 4, requires_grad=True)
        >>> with SavedTensorMeter([("conv", conv)]) as meter:
        ...     y = conv(x)
        >>> meter.layer_bytes["conv"] == x.numel() * 4  # the input; the weight does not count
        True
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]] = (), *, isolated: bool = False) -> None:
        self.isolated = isolated
        self._layers = list(layers)
        self._current: list[str] = []
        self._all: dict[tuple[int, int], int] = {}
        self._per_layer: dict[str, dict[tuple[int, int], int]] = {name: {} for name, _ in self._layers}
        self._skip: set[tuple[int, int]] = set()
        self._hooks: list[Any] = []
        self._active = False

    @property
    def total_bytes(self) -> int:
        return sum(self._all.values())

    @property
    def layer_bytes(self) -> dict[str, int]:
        return {name: sum(keys.values()) for name, keys in self._per_layer.items()}

    @property
    def bytes_in_layers(self) -> int:
        union: dict[tuple[int, int], int] = {}
        for keys in self._per_layer.values():
            union.update(keys)
        return sum(union.values())

    def _record(self, key: tuple[int, int]) -> None:
        if key not in self._skip:
            self._all[key] = key[1]
            if self._current:
                self._per_layer[self._current[-1]][key] = key[1]

    def _enter_layer(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            self._current.append(name)

        return hook

    def _leave_layer(self, module: nn.Module, args: Any, output: Any) -> None:
        self._current.pop()

    def __enter__(self) -> "SavedTensorMeter":
        global _SHARED_HOOKS
        if self._active:
            raise RuntimeError("this SavedTensorMeter is already measuring")
        for name, module in self._layers:
            self._skip.update(k for p in module.parameters() if (k := _storage_key(p)) is not None)
            self._hooks.append(module.register_forward_pre_hook(self._enter_layer(name)))
            self._hooks.append(module.register_forward_hook(self._leave_layer))
        if not _ACTIVE:
            _SHARED_HOOKS = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
            _SHARED_HOOKS.__enter__()
        _ACTIVE.append(self)
        self._active = True
        return self

    def skip_parameters_of(self, model: nn.Module, *, buffers: bool = False) -> None:
        """Do not count the parameters of ``model`` (and its buffers, with ``buffers=True``;
        call before the forward)."""
        tensors = list(model.parameters()) + (list(model.buffers()) if buffers else [])
        self._skip.update(k for t in tensors if (k := _storage_key(t)) is not None)

    def close(self) -> None:
        """Stop measuring (what ``with`` does on exit); a meter that is not measuring is left as it is."""
        global _SHARED_HOOKS
        if not self._active:
            return
        self._active = False
        _ACTIVE.remove(self)
        if not _ACTIVE and _SHARED_HOOKS is not None:
            hooks, _SHARED_HOOKS = _SHARED_HOOKS, None
            hooks.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._current.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()
