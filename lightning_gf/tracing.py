"""Run a model once and record, in execution order, when each module ran."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ModuleCalls:
    """The calls of one module during a traced forward.

    ``first_start`` and ``last_end`` are positions on one event clock shared by all
    modules; ``out_sizes`` are the spatial sizes of a conv's outputs.
    """

    first_start: int
    last_end: int = -1
    out_sizes: list[tuple[int, ...]] = field(default_factory=list)


def call_model(model: nn.Module, example_input: Any) -> Any:
    """Call ``model`` the way Lightning calls it with ``example_input_array``.

    A tuple or list is unpacked into positional arguments, a dict into keyword
    arguments; anything else is the single argument.
    """
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def trace_calls(model: nn.Module, example_input: Any) -> dict[str, ModuleCalls]:
    """Forward ``example_input`` once, in eval mode and without grad, and time each module.

    The training flags of every module are restored afterwards, and nothing else
    changes (BatchNorm running statistics are not updated in eval mode).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        >>> calls = trace_calls(net, torch.zeros(1, 1, 5, 5))
        >>> calls["0"].out_sizes, calls["0"].last_end < calls["1"].first_start
        ([(3, 3)], True)
    """
    calls: dict[str, ModuleCalls] = {}
    clock = [0]

    def tick() -> int:
        clock[0] += 1
        return clock[0]

    def pre_hook(name: str):
        def hook(module: nn.Module, args: Any) -> None:
            now = tick()
            if name not in calls:
                calls[name] = ModuleCalls(first_start=now)

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            record = calls[name]
            record.last_end = tick()
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                record.out_sizes.append(tuple(output.shape[-2:]))

        return hook

    flags = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        model.eval()
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return calls
