"""Give one module instance extra behaviour by swapping its class, and take it back.

``swap_class(module, Mixin)`` turns ``module`` into an instance of a subclass of
both ``Mixin`` and its own class, so it stays an instance of its class (an
``nn.Conv2d`` stays an ``nn.Conv2d``), keeps its ``state_dict`` keys, and copies
and pickles like any module. ``restore_class(module)`` undoes it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def _swapped_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__}[{base.__name__}]", (mixin, base), {"_gf_base_class": base})
    return _CLASSES[key]


def _new_swapped(mixin: type, base: type) -> Any:
    """Unpickling entry point: an empty instance of the swapped class."""
    cls = _swapped_class(mixin, base)
    return cls.__new__(cls)


class Swappable:
    """Base of every mixin used with :func:`swap_class`; makes copies and pickles work.

    Example:
        >>> class Loud(Swappable):
        ...     def extra_repr(self) -> str:
        ...         return "loud"
        >>> m = nn.Linear(2, 2)
        >>> swap_class(m, Loud)
        >>> isinstance(m, nn.Linear), repr(m)
        (True, 'Loud[Linear](loud)')
        >>> restore_class(m)
        >>> type(m) is nn.Linear
        True
    """

    _gf_base_class: type

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_new_swapped, (_mixin_of(type(self)), self._gf_base_class), self.__dict__.copy())


def _mixin_of(cls: type) -> type:
    return cls.__bases__[0]


def is_swapped(module: nn.Module, mixin: type = Swappable) -> bool:
    """Whether ``module`` currently carries ``mixin`` (any mixin by default)."""
    return isinstance(module, mixin)


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``mixin`` on top of its own class."""
    if is_swapped(module):
        raise RuntimeError(f"{type(module).__name__} already carries a lightning_gf patch")
    module.__class__ = _swapped_class(mixin, type(module))


def restore_class(module: nn.Module) -> None:
    """Give ``module`` back its original class."""
    if is_swapped(module):
        module.__class__ = module._gf_base_class  # type: ignore[union-attr]
