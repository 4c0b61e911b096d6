"""What to filter and how (:class:`GradientFilterConfig`), and which backend runs the kernels.

Every layer of the package may import this module; it imports nothing of the package.

Backends (see ``docs/architecture.md``): ``"cpu"`` (the compiled C++ kernels),
``"triton"`` (CUDA; CPU tensors too under ``TRITON_INTERPRET=1``), ``"small_maps"``
(plain PyTorch, one 0/1-matrix product per small map) and ``"reference"`` (plain PyTorch
only). By default each call takes the first that fits, in that order; :func:`force_backend`
or ``LIGHTNING_GF_BACKEND=<name>`` pins one. ``LIGHTNING_GF_CPU_KERNELS=0`` and
``LIGHTNING_GF_TRITON=0`` take the compiled and the Triton kernels out of the default order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Union

RSpec = Union[int, Mapping[str, int]]
BACKENDS = ("cpu", "triton", "small_maps", "reference")
ENV_BACKEND = "LIGHTNING_GF_BACKEND"


def check_r(r: Any, where: str = "r") -> None:
    """Raise a ``ValueError`` unless ``r`` is an int >= 1 (``1``: no filtering).

    Example:
        >>> check_r(0)
        Traceback (most recent call last):
        ...
        ValueError: r must be an int >= 1 (1 means no filtering), got 0
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{where} must be an int >= 1 (1 means no filtering), got {r!r}")


def _patterns(value: Any, name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{name} must be a list of fnmatch patterns of conv names, e.g. ['layer4.*'], got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class GradientFilterConfig:
    """Every option of the filter, checked once.

    :func:`lightning_gf.apply_gradient_filter`, ``GradientFilterCallback``,
    :func:`lightning_gf.diagnostics.gradient_fidelity` and
    :func:`lightning_gf.diagnostics.layer_report` take one (their keyword arguments build
    one when none is given).

    Attributes:
        r: patch size, or a mapping from fnmatch patterns of conv names to patch sizes
            (first match wins; convs no pattern matches are not filtered).
        depth: how many of the last eligible convs (in execution order) to filter.
        include: fnmatch patterns; only matching convs may be filtered.
        exclude: fnmatch patterns; matching convs are never filtered.
        filter_fn: ``filter_fn(name, conv) -> bool``; only convs it accepts may be filtered.
        freeze: turn off ``requires_grad`` for every parameter used before the first
            filtered conv.
        bn_eval: keep every BatchNorm in eval mode, also after ``model.train()``.
        stride_correction: divide the filtered gradients of strided convs by
            ``stride_h * stride_w`` (``False``: the paper's convention).
        lean: let the trained region's BatchNorm, ReLU, ReLU6 and Dropout keep patch sums
            and bit masks instead of full tensors (``docs/memory.md``).

    Example:
        >>> config = GradientFilterConfig(r={"layer4.*": 2}, depth=2, exclude=["*.downsample.*"])
        >>> config.exclude, config.lean
        (('*.downsample.*',), True)
        >>> GradientFilterConfig(depth=0)
        Traceback (most recent call last):
        ...
        ValueError: depth must be an int >= 1 (the number of last conv layers to filter), got 0
    """

    r: RSpec = 2
    depth: int = 3
    include: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    filter_fn: Optional[Callable[[str, Any], bool]] = None
    freeze: bool = True
    bn_eval: bool = True
    stride_correction: bool = True
    lean: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.r, Mapping):
            if not self.r:
                raise ValueError("r mapping is empty: give an int or {pattern: r, ...}")
            for pattern, value in self.r.items():
                check_r(value, f"r[{pattern!r}]")
            object.__setattr__(self, "r", dict(self.r))
        else:
            check_r(self.r)
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an int >= 1 (the number of last conv layers to filter), got {self.depth!r}")
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError(f"filter_fn must be callable as filter_fn(name, conv) -> bool, got {self.filter_fn!r}")

    def options(self) -> dict[str, Any]:
        """The options as keyword arguments, lists for the patterns (``filter_fn`` left out:
        a function does not go into a checkpoint or a YAML file)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "filter_fn"}
        for key in ("include", "exclude"):
            out[key] = list(out[key]) if out[key] is not None else None
        return out


def resolve_config(config: Optional[GradientFilterConfig], **options: Any) -> GradientFilterConfig:
    """``config``, or one built from ``options``; options other than their defaults beside
    a config are refused (one source of truth).

    Example:
        >>> resolve_config(None, r=4).r
        4
        >>> resolve_config(GradientFilterConfig(r=4), depth=2)
        Traceback (most recent call last):
        ...
        TypeError: give the options either in config or as arguments, not both: ['depth']
    """
    if config is None:
        return GradientFilterConfig(**options)
    if not isinstance(config, GradientFilterConfig):
        raise TypeError(f"config must be a GradientFilterConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in fields(GradientFilterConfig)}
    given = sorted(k for k, v in options.items() if v != defaults[k])
    if given:
        raise TypeError(f"give the options either in config or as arguments, not both: {given}")
    return config


def _backend_from_environment() -> Optional[str]:
    name = os.environ.get(ENV_BACKEND, "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={name!r} names no backend: use one of {', '.join(BACKENDS)} (or unset it)")
    return name


# Read by the backends on every call; set only through set_backend / force_backend.
_FORCED: Optional[str] = _backend_from_environment()


def get_backend() -> Optional[str]:
    """The backend pinned by :func:`set_backend`, :func:`force_backend` or
    ``LIGHTNING_GF_BACKEND``; ``None`` when each call takes the first that fits.

    Example:
        >>> with force_backend("reference"):
        ...     get_backend()
        'reference'
    """
    return _FORCED


def set_backend(name: Optional[str]) -> Optional[str]:
    """Pin one backend for every later call (``None``: the default order); returns the previous one.

    Example:
        >>> previous = set_backend("reference")
        >>> _ = set_backend(previous)
    """
    global _FORCED
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {name!r}")
    previous, _FORCED = _FORCED, name
    return previous


@contextmanager
def force_backend(name: Optional[str]) -> Iterator[None]:
    """Within the block every filtered op runs on backend ``name`` (``None``: the default order).

    Example:
        >>> import torch
        >>> from lightning_gf import filtered_conv2d
        >>> x, w = torch.randn(1, 2, 4, 4, requires_grad=True), torch.randn(2, 2, 3, 3)
        >>> with force_backend("reference"):
        ...     filtered_conv2d(x, w, padding=1, r=2).sum().backward()
    """
    previous = set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)
