"""Gradient fidelity: how close the filtered gradients come to the exact ones, per layer.

:func:`gradient_fidelity` runs one batch twice through the same model with the same
weights (and the same dropout masks): once with every filtered layer computing its
exact backward, once with the filter. For each filtered layer it compares the weight
gradient ``g_w`` and the gradient the layer sends to its input ``g_x`` (that layer's
own contribution). Both passes see the whole network, so the filtered pass includes
the error that deeper filtered layers pass down: these are the gradients the
optimizer would get.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_gf.config import GradientFilterConfig, resolve_config
from lightning_gf.diagnostics.model_state import model_state_kept, rng_rewinder
from lightning_gf.surgery.apply import RSpec, apply_gradient_filter
from lightning_gf.surgery.class_swap import is_swapped
from lightning_gf.surgery.handle import FilteredLayer, GradientFilterHandle
from lightning_gf.surgery.tracing import model_input_of

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: runs the model on the batch and returns the loss."""

_METRICS = ("gw_cos", "gw_norm_ratio", "gx_cos", "gx_norm_ratio")


@dataclass(frozen=True)
class LayerFidelity:
    """Filtered against exact gradients of one layer.

    ``*_cos`` is the cosine similarity, ``*_norm_ratio`` is ``|filtered| / |exact|``.
    A value is ``None`` when that gradient is not computed in training (``g_x`` of a
    layer whose input needs no gradient, e.g. the first filtered layer when everything
    before it is frozen) or when the exact gradient is zero.
    """

    name: str
    r: int
    gw_cos: Optional[float]
    gw_norm_ratio: Optional[float]
    gx_cos: Optional[float]
    gx_norm_ratio: Optional[float]


@dataclass(frozen=True)
class FidelityResult:
    """The per-layer fidelity, in forward order.

    Example:
        >>> result = FidelityResult([LayerFidelity("conv", 2, 0.9, 1.1, None, None)])
        >>> result.as_dict()["conv"]["gw_cos"]
        0.9
        >>> result.metrics()
        {'gf/fidelity/conv/gw_cos': 0.9, 'gf/fidelity/conv/gw_norm_ratio': 1.1}
    """

    layers: list[LayerFidelity]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{layer name: {"r": ..., "gw_cos": ..., "gw_norm_ratio": ..., "gx_cos": ..., "gx_norm_ratio": ...}}``."""
        return {layer.name: {k: v for k, v in asdict(layer).items() if k != "name"} for layer in self.layers}

    def metrics(self, prefix: str = "gf/fidelity") -> dict[str, float]:
        """Flat ``{"<prefix>/<layer>/<metric>": value}`` for a logger (``None`` values left out)."""
        return {
            f"{prefix}/{layer.name}/{key}": value
            for layer in self.layers
            for key in _METRICS
            if (value := getattr(layer, key)) is not None
        }

    def table(self) -> str:
        """A plain-text table, one row per layer."""
        header = ("layer", "r", "g_w cos", "g_w ratio", "g_x cos", "g_x ratio")
        rows = [
            (layer.name, str(layer.r), *(_fmt(getattr(layer, key)) for key in _METRICS)) for layer in self.layers
        ]
        return format_table(header, rows)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-align the first column, right-align the others.

    Example:
        >>> print(format_table(("a", "b"), [("x", "10")]))
        a   b
        -  --
        x  10
    """
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def _compare(filtered: Optional[Tensor], exact: Optional[Tensor]) -> tuple[Optional[float], Optional[float]]:
    if filtered is None or exact is None:
        return None, None
    a = filtered.detach().double().flatten()
    b = exact.detach().double().flatten()
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_b == 0.0 or not math.isfinite(norm_b):
        return None, None
    cos = float(a @ b) / (norm_a * norm_b) if norm_a > 0 else 0.0
    return cos, norm_a / norm_b


class _InputCapture:
    """Gives every filtered layer's input an alias, so that its own ``g_x`` can be asked for."""

    def __init__(self, layers: list[FilteredLayer]) -> None:
        self.aliases: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}
        self._hooks = [layer.module.register_forward_pre_hook(self._hook(layer.name)) for layer in layers]

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
            x = args[0] if args else None
            if not (isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()):
                return None
            alias = x.view_as(x)
            self.aliases[name].append(alias)
            return (alias, *args[1:])

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def _one_pass(
    model: nn.Module, batch: Any, loss_fn: LossFn, layers: list[FilteredLayer]
) -> tuple[list[Optional[Tensor]], list[Optional[Tensor]]]:
    """The ``g_w`` and ``g_x`` (flattened over calls) of every layer, by ``torch.autograd.grad``."""
    capture = _InputCapture(layers)
    try:
        loss = loss_fn(model, batch)
    finally:
        capture.remove()
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        got = type(loss).__name__ if not isinstance(loss, Tensor) else f"a tensor of shape {tuple(loss.shape)}"
        raise ValueError(f"loss_fn(model, batch) must return a scalar tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError(
            "the loss does not require grad: check that loss_fn runs the model on the batch under grad "
            "and that the filtered layers are trainable"
        )
    wanted: list[Tensor] = []
    where_w: list[Optional[int]] = []
    for layer in layers:
        weight = layer.module.weight
        where_w.append(len(wanted) if weight.requires_grad else None)
        if weight.requires_grad:
            wanted.append(weight)
    where_x: list[list[int]] = []
    for layer in layers:
        aliases = capture.aliases[layer.name]
        where_x.append(list(range(len(wanted), len(wanted) + len(aliases))))
        wanted.extend(aliases)
    grads = torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ()
    g_w = [None if i is None else grads[i] for i in where_w]
    g_x: list[Optional[Tensor]] = []
    for indices in where_x:
        parts = [grads[i].flatten() for i in indices if grads[i] is not None]
        g_x.append(torch.cat(parts) if parts else None)
    return g_w, g_x


def fidelity_with_handle(
    model: nn.Module, batch: Any, loss_fn: LossFn, handle: GradientFilterHandle, *, train: bool = True
) -> FidelityResult:
    """:func:`gradient_fidelity` on a model whose filter ``handle`` is already installed.

    The handle stays installed; its layers' ``r`` and running stats are as before.
    """
    if handle.removed:
        raise ValueError("the gradient filter handle was removed: install the filter again or pass r/depth instead")
    layers = handle.layers
    saved_stats = [replace(layer.module.gf_stats) for layer in layers]  # type: ignore[attr-defined]
    with model_state_kept(model, train=train):
        rewind = rng_rewinder(model)
        try:
            with handle.plain():  # r = 1: plain convs, plain lean modules
                exact_w, exact_x = _one_pass(model, batch, loss_fn, layers)
            rewind()
            filtered_w, filtered_x = _one_pass(model, batch, loss_fn, layers)
        finally:
            for layer, stats in zip(layers, saved_stats):
                layer.module.gf_stats = stats  # type: ignore[attr-defined]
    results = []
    for i, layer in enumerate(layers):
        gw = _compare(filtered_w[i], exact_w[i])
        gx = _compare(filtered_x[i], exact_x[i])
        results.append(LayerFidelity(layer.name, layer.r, gw[0], gw[1], gx[0], gx[1]))
    return FidelityResult(results)


def gradient_fidelity(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    r: RSpec = 2,
    depth: int = 3,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    stride_correction: bool = True,
    freeze: bool = True,
    bn_eval: bool = True,
    example_input: Any = None,
    train: bool = True,
    config: Optional[GradientFilterConfig] = None,
) -> FidelityResult:
    """Cosine similarity and norm ratio of filtered against exact gradients, per filtered layer.

    Installs the filter as :func:`lightning_gf.apply_gradient_filter` would (same
    arguments), runs ``loss_fn(model, batch)`` and its backward once with exact and
    once with filtered convs (same weights, same dropout masks), and removes the filter.
    The model is left as it was: parameters, buffers, ``requires_grad``, ``.grad``,
    train/eval flags and the torch random generators. If the model already carries a
    filter, use :func:`fidelity_with_handle`.

    Args:
        model: any ``nn.Module``.
        batch: what ``loss_fn`` takes.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        r, depth, include, exclude, stride_correction, freeze, bn_eval, config: as in
            :func:`lightning_gf.apply_gradient_filter`.
        example_input: the model input used to find the layers; by default the batch
            itself if it is a tensor, else its first element (or a usual dict key).
        train: run both passes in train mode (as in fine-tuning); ``False``: eval mode.

    Returns:
        A :class:`FidelityResult`: ``.layers``, ``.as_dict()``, ``.table()``, ``.metrics()``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> result = gradient_fidelity(net, x, lambda m, b: m(b).square().sum(), r=1, depth=2)
        >>> [round(layer.gw_cos, 6) for layer in result.layers]
        [1.0, 1.0]
        >>> print(result.table())  # doctest: +NORMALIZE_WHITESPACE
        layer  r  g_w cos  g_w ratio  g_x cos  g_x ratio
        -----  -  -------  ---------  -------  ---------
        0      1   1.0000     1.0000        -          -
        2      1   1.0000     1.0000   1.0000     1.0000
    """
    if any(is_swapped(m) for m in model.modules()):
        raise RuntimeError(
            "this model already carries a gradient filter: use "
            "lightning_gf.diagnostics.fidelity.fidelity_with_handle(model, batch, loss_fn, handle) with its handle"
        )
    if example_input is None:
        example_input = model_input_of(batch)
    config = resolve_config(config, r=r, depth=depth, include=include, exclude=exclude,
                            stride_correction=stride_correction, freeze=freeze, bn_eval=bn_eval)
    with model_state_kept(model):
        handle = apply_gradient_filter(model, config, example_input=example_input)
        try:
            return fidelity_with_handle(model, batch, loss_fn, handle, train=train)
        finally:
            handle.remove()


def training_step_loss(batch_idx: int = 0) -> LossFn:
    """A ``loss_fn`` that calls ``model.training_step(batch, batch_idx)`` with logging muted.

    For a LightningModule; the loss is the returned tensor or its ``"loss"`` entry.
    """

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        muted = {"log": _no_log, "log_dict": _no_log}
        model.__dict__.update(muted)
        try:
            out = model.training_step(batch, batch_idx)  # type: ignore[operator]
        finally:
            for key in muted:
                model.__dict__.pop(key, None)
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, Tensor):
            raise ValueError(
                "gradient fidelity needs training_step to return the loss (a tensor or a dict with 'loss'), "
                f"got {type(out).__name__}"
            )
        return out

    return loss_fn


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
