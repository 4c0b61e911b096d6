"""Model inputs (how to call a model, where its input is in a batch) and a traced forward
that records, in execution order, when each module ran."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn


@dataclass
class ModuleCalls:
    """The calls of one module during a traced forward.

    ``first_start`` and ``last_end`` are positions on one event clock shared by all
    modules; ``out_sizes`` are the spatial sizes of a conv's outputs.
    """

    first_start: int
    last_end: int = -1
    out_sizes: list[tuple[int, ...]] = field(default_factory=list)


class ExampleInputError(ValueError):
    """The model's forward failed on the example input used to find its layers.

    Example:
        >>> try:
        ...     trace_calls(nn.Conv2d(3, 2, 1), torch.zeros(1, 5, 4, 4))
        ... except ExampleInputError as err:
        ...     print(str(err).split(":")[0])
        the model's forward failed on the example input (a tensor of shape (1, 5, 4, 4))
    """


def describe_input(example_input: Any) -> str:
    """A short description of a model input, for error messages.

    Example:
        >>> describe_input({"image": torch.zeros(1, 3, 8, 8)})
        "a dict with keys ['image']"
    """
    if isinstance(example_input, torch.Tensor):
        return f"a tensor of shape {tuple(example_input.shape)}"
    if isinstance(example_input, dict):
        return f"a dict with keys {list(example_input)}"
    if isinstance(example_input, (tuple, list)):
        return f"a {type(example_input).__name__} of {len(example_input)} positional arguments"
    return f"a {type(example_input).__name__}"


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


_INPUT_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")


def model_input_of(batch: Any) -> Any:
    """The model input inside a training batch: the batch itself if it is a tensor,
    its first element if it is a tuple or list, else a tensor under a usual key."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return model_input_of(batch[0])
    if isinstance(batch, Mapping):
        for key in _INPUT_KEYS:
            if key in batch:
                return batch[key]
        for value in batch.values():
            if isinstance(value, Tensor):
                return value
    raise ValueError(
        f"cannot find the model input in a training batch of type {type(batch).__name__}: "
        "set `example_input_array` on your LightningModule"
    )


# How a model's forward input comes out of a training batch: the tensor model_input_of finds,
# or the whole batch as the one positional argument (a forward that takes the batch dict).
INPUT_KINDS = ("input", "batch")


def forward_input(batch: Any, kind: str) -> Any:
    """The forward input of ``batch`` by ``kind`` (see ``INPUT_KINDS``), as :func:`call_model` takes it.

    Example:
        >>> batch = {"image": torch.zeros(2, 3, 4, 4), "label": torch.zeros(2)}
        >>> forward_input(batch, "input").shape, forward_input(batch, "batch")[0] is batch
        (torch.Size([2, 3, 4, 4]), True)
    """
    if kind == "input":
        return model_input_of(batch)
    if kind == "batch":
        return (batch,)
    raise ValueError(f"kind must be one of {INPUT_KINDS}, got {kind!r}")


def tensors_in(inputs: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) tuple, list or dict, depth first."""
    if isinstance(inputs, Tensor):
        yield inputs
    elif isinstance(inputs, (tuple, list)):
        for item in inputs:
            yield from tensors_in(item)
    elif isinstance(inputs, Mapping):
        for item in inputs.values():
            yield from tensors_in(item)


def samples_in(inputs: Any) -> Optional[int]:
    """The batch size of a model input: the first dimension of its first tensor.

    Example:
        >>> samples_in({"image": torch.zeros(5, 3, 8, 8), "scale": 2.0})
        5
    """
    first = next((t for t in tensors_in(inputs) if t.dim() > 0), None)
    return None if first is None else first.shape[0]


def take_samples(inputs: Any, k: int) -> Any:
    """The first ``k`` samples of every tensor of the batch's size in ``inputs``.

    Example:
        >>> take_samples((torch.zeros(5, 2), torch.ones(3)), 2)[0].shape
        torch.Size([2, 2])
    """
    n = samples_in(inputs)
    return apply_to_collection(inputs, Tensor, lambda t: t[:k] if t.dim() > 0 and t.shape[0] == n else t)


def trace_calls(model: nn.Module, example_input: Any) -> dict[str, ModuleCalls]:
    """Forward ``example_input`` once, in eval mode and without grad, and time each module.

    The training flags of every module are restored afterwards, and nothing else
    changes (BatchNorm running statistics are not updated in eval mode). An error of the
    forward is raised as :class:`ExampleInputError`, the original chained to it.

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
            try:
                call_model(model, example_input)
            except Exception as err:  # the user's forward: any error, said in terms of the example
                raise ExampleInputError(
                    f"the model's forward failed on the example input ({describe_input(example_input)}): "
                    f"{type(err).__name__}: {err}. Pass an input the forward accepts (a tensor, a tuple of "
                    "positional arguments or a dict of keyword arguments)"
                ) from err
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return calls
