"""``apply_gradient_filter``: pick the last conv layers of any ``nn.Module`` and filter them."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from lightning_gf.config import GradientFilterConfig, RSpec, resolve_config
from lightning_gf.ops.stats import FilterStats
from lightning_gf.surgery.class_swap import is_swapped, swap_class
from lightning_gf.surgery.filtered_conv import FilteredConvMixin, unsupported_reason
from lightning_gf.surgery.frozen_batchnorm import EvalModeMixin
from lightning_gf.surgery.handle import FilteredLayer, GradientFilterHandle
from lightning_gf.surgery.lean_modules import (
    LeanBatchNormMixin,
    LeanDropoutMixin,
    LeanEvalBatchNormMixin,
    LeanReLU6Mixin,
    LeanReLUMixin,
    lean_batchnorm_supported,
)
from lightning_gf.surgery.tracing import ModuleCalls, trace_calls


def _check_patterns(patterns: Sequence[str], names: list[str], what: str) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"{what} pattern {pattern!r} matches no nn.Conv2d of the model; "
                f"conv names look like {names[:3]} (fnmatch patterns, e.g. 'layer4.*')"
            )


def _r_for(name: str, r: RSpec) -> Optional[int]:
    if isinstance(r, int):
        return r
    for pattern, value in r.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    return None


def _validate(model: nn.Module, config: GradientFilterConfig) -> list[str]:
    """What the options say about this model (the options themselves were checked by the config)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(is_swapped(m) for m in model.modules()):
        raise RuntimeError(
            "this model already has a gradient filter installed: call handle.remove() on the first one "
            "before installing another"
        )
    conv_names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted and (not conv_names or isinstance(model, torch.jit.ScriptModule)):
        what = "the model is" if isinstance(model, torch.jit.ScriptModule) else f"its submodules {scripted[:3]} are"
        raise TypeError(
            f"TorchScript modules are not supported: {what} torch.jit.script/trace output, whose layers are "
            "compiled code, not nn.Conv2d modules the filter can patch. Apply the filter to the eager model "
            "before scripting it, or, for speed, compile the filtered model with torch.compile (supported)"
        )
    if not conv_names:
        raise ValueError("the model has no nn.Conv2d layer: gradient filtering applies to Conv2d layers only")
    if scripted:
        warnings.warn(
            f"TorchScript submodules are opaque to the gradient filter and train with plain backprop: {scripted[:3]}",
            stacklevel=3,
        )
    if isinstance(config.r, Mapping):
        _check_patterns(list(config.r), conv_names, "r")
    _check_patterns(config.include or [], conv_names, "include")
    _check_patterns(config.exclude or [], conv_names, "exclude")
    return conv_names


def _select(
    model: nn.Module, calls: dict[str, ModuleCalls], config: GradientFilterConfig
) -> list[tuple[str, nn.Conv2d, int, tuple[int, ...]]]:
    include, exclude, depth = config.include, config.exclude, config.depth
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name in calls]
    if not convs:
        raise ValueError("none of the model's nn.Conv2d layers ran on the example input")
    convs.sort(key=lambda item: calls[item[0]].first_start)
    chosen, unsupported = [], []
    for name, conv in reversed(convs):
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if config.filter_fn is not None and not config.filter_fn(name, conv):
            continue
        layer_r = _r_for(name, config.r)
        if layer_r is None:
            continue
        reason = unsupported_reason(conv)
        if reason is not None:
            unsupported.append(f"{name} ({reason})")
            continue
        sizes = calls[name].out_sizes
        if layer_r > 1 and any(min(size) < layer_r for size in sizes):
            continue  # map smaller than r x r: trains normally, not counted
        chosen.append((name, conv, layer_r, min(sizes)))
        if len(chosen) == depth:
            break
    if len(chosen) < depth:
        raise ValueError(
            f"depth={depth} but the model has only {len(chosen)} eligible Conv2d layers "
            f"(output map at least r x r, matching r/include/exclude/filter_fn, supported): lower depth to "
            f"{max(len(chosen), 1)} or widen the patterns"
        )
    if unsupported:
        warnings.warn(
            "gradient filter skipped convs it cannot filter correctly (they train with plain backprop): "
            + ", ".join(reversed(unsupported)),
            stacklevel=3,
        )
    chosen.reverse()
    return chosen


def _parameters_to_freeze(
    model: nn.Module, calls: dict[str, ModuleCalls], start: int
) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose every use ended before the event ``start``."""
    owners_done: dict[nn.Parameter, bool] = {}
    names: dict[nn.Parameter, str] = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            record = calls.get(mod_name)
            done = record is not None and record.last_end < start
            owners_done[param] = owners_done.get(param, True) and done
            names.setdefault(param, f"{mod_name}.{p_name}" if mod_name else p_name)
    return [(names[p], p) for p, done in owners_done.items() if done]


def _lean_mixin(module: nn.Module, bn_eval: bool) -> Optional[type]:
    """The lean behaviour for a module of the trained region, if it has one."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not lean_batchnorm_supported(module):
            return None
        return LeanEvalBatchNormMixin if bn_eval else LeanBatchNormMixin
    kinds = {nn.ReLU: LeanReLUMixin, nn.ReLU6: LeanReLU6Mixin, nn.Dropout: LeanDropoutMixin}
    return kinds.get(type(module))  # exact types: subclasses may change forward


def _region_r(first_start: int, chosen_starts: list[tuple[int, int]]) -> int:
    """The ``r`` of the last filtered conv that started before ``first_start``."""
    r = chosen_starts[0][1]
    for start, layer_r in chosen_starts:
        if start < first_start:
            r = layer_r
    return r


def apply_gradient_filter(
    model: nn.Module,
    r: Union[RSpec, GradientFilterConfig] = 2,
    depth: int = 3,
    *,
    example_input: Any = None,
    freeze: bool = True,
    bn_eval: bool = True,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
    stride_correction: bool = True,
    lean: bool = True,
    config: Optional[GradientFilterConfig] = None,
) -> GradientFilterHandle:
    """Filter the gradients of the last ``depth`` Conv2d layers of ``model``, in place.

    The layers are found by running one forward of ``example_input`` (in eval
    mode, without grad) and taking the last ``depth`` eligible convs in execution
    order. A conv whose output map is smaller than ``r x r`` is not filtered and
    not counted, but trains normally.

    Args:
        model: any ``nn.Module``.
        r: patch size, or a mapping from fnmatch patterns of conv names to patch
            sizes (first match wins; convs no pattern matches are not filtered); or a
            whole :class:`~lightning_gf.config.GradientFilterConfig` (as ``config``).
        depth: how many of the last eligible convs to filter.
        example_input: model input (a tensor, a tuple of positional arguments or a
            dict of keyword arguments); defaults to ``model.example_input_array``.
        freeze: turn off ``requires_grad`` for every parameter used before the
            first filtered layer.
        bn_eval: keep every BatchNorm in eval mode, also after ``model.train()``.
        include: fnmatch patterns; only matching convs may be filtered.
        exclude: fnmatch patterns; matching convs are never filtered.
        filter_fn: ``filter_fn(name, conv) -> bool``; only convs it accepts may be filtered.
        stride_correction: see :func:`lightning_gf.ops.conv.filtered_conv2d`.
        lean: between the first filtered conv and the output, let BatchNorm2d (eval
            mode) keep only patch sums of its input, and ReLU, ReLU6 and Dropout keep
            bit-packed masks (see ``docs/memory.md``: what stays exact, what does not).
        config: every option above in one :class:`~lightning_gf.config.GradientFilterConfig`;
            the keyword arguments then stay at their defaults.

    Returns:
        A :class:`GradientFilterHandle`; ``handle.remove()`` undoes everything.

    Raises:
        ValueError: bad ``r``/``depth``, no conv, a pattern matching no conv, too few
            eligible convs, or no example input; :class:`~lightning_gf.surgery.tracing.ExampleInputError`
            (a ``ValueError``) if the forward fails on the example input. The model is then
            left unchanged.
        TypeError: ``model`` is not an ``nn.Module``, or is a TorchScript module.
        RuntimeError: a filter is already installed on the model.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...     torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        ...     torch.nn.Linear(8, 2))
        >>> handle = apply_gradient_filter(net, r=2, depth=1, example_input=torch.zeros(1, 3, 16, 16))
        >>> [layer.name for layer in handle.layers], net[0].weight.requires_grad, net[6].weight.requires_grad
        (['3'], False, True)
        >>> net.train().training, net[1].training
        (True, False)
        >>> handle.remove()
    """
    if isinstance(r, GradientFilterConfig):  # apply_gradient_filter(model, config), as torchao's quantize_
        if config is not None:
            raise TypeError("give the GradientFilterConfig once: as the second argument or as config=")
        config, r = r, 2
    config = resolve_config(config, r=r, depth=depth, freeze=freeze, bn_eval=bn_eval, include=include,
                            exclude=exclude, filter_fn=filter_fn, stride_correction=stride_correction, lean=lean)
    _validate(model, config)
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "no example input: pass example_input=... (a batch the model's forward accepts) "
            "or set model.example_input_array"
        )
    calls = trace_calls(model, example_input)
    chosen = _select(model, calls, config)

    requires_grad = {p: p.requires_grad for p in model.parameters()}
    frozen: list[str] = []
    if config.freeze:
        start = min(calls[name].first_start for name, *_ in chosen)
        for name, param in _parameters_to_freeze(model, calls, start):
            param.requires_grad_(False)
            frozen.append(name)

    layers, swapped = [], []
    for name, conv, layer_r, out_size in chosen:
        swap_class(conv, FilteredConvMixin)
        conv.gf_r = layer_r
        conv.gf_stride_correction = config.stride_correction
        conv.gf_stats = FilterStats()
        layers.append(FilteredLayer(name=name, module=conv, r=layer_r, out_size=out_size))
        swapped.append(conv)

    lean_names: list[str] = []
    if config.lean:
        starts = sorted((calls[name].first_start, layer_r) for name, _, layer_r, _ in chosen)
        for name, module in model.named_modules():
            record = calls.get(name)
            if record is None or record.first_start <= starts[0][0] or is_swapped(module):
                continue
            mixin = _lean_mixin(module, config.bn_eval)
            region_r = _region_r(record.first_start, starts)
            if mixin is None or region_r == 1:
                continue
            swap_class(module, mixin)
            module.gf_r = region_r
            swapped.append(module)
            lean_names.append(name)

    eval_batchnorms: list[nn.Module] = []
    if config.bn_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not is_swapped(module):
                    swap_class(module, EvalModeMixin)
                    swapped.append(module)
                module.training = False
                eval_batchnorms.append(module)
    return GradientFilterHandle(model, layers, frozen, swapped, eval_batchnorms, requires_grad, lean_names)
