"""``once_differentiable(message)``: a backward that refuses a second differentiation with ``message``.

Like ``torch.autograd.function.once_differentiable``, but the error names the op and
the fix instead of a generic "trying to differentiate twice".
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch


def _refusing_function(message: str) -> type:
    class _RefuseDoubleBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *grads: torch.Tensor) -> Any:  # type: ignore[override]
            outs = tuple(g.view_as(g) for g in grads)
            return outs if len(outs) > 1 else outs[0]

        @staticmethod
        def backward(ctx: Any, *grad_outputs: Any) -> Any:  # type: ignore[override]
            raise RuntimeError(message)

    return _RefuseDoubleBackward


def once_differentiable(message: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate an ``autograd.Function.backward``: it runs without grad, and differentiating
    its results (``create_graph=True`` then a second backward) raises ``RuntimeError(message)``,
    also when the incoming gradient is a constant (e.g. the loss is a plain sum).

    Example:
        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     @once_differentiable("Square has no double backward")
        ...     def backward(ctx, g):
        ...         (x,) = ctx.saved_tensors
        ...         return 2 * x * g
        >>> x = torch.ones(2, requires_grad=True)
        >>> (gx,) = torch.autograd.grad(Square.apply(x).sum(), x, create_graph=True)
        >>> try:
        ...     gx.sum().backward()
        ... except RuntimeError as err:
        ...     print(err)
        Square has no double backward
    """
    refuse = _refusing_function(message)

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *args: Any) -> Any:
            if not torch.is_grad_enabled():  # a plain backward, not create_graph=True: grad is off already
                return backward(ctx, *args)
            with torch.no_grad():
                outputs = backward(ctx, *args)
            single = not isinstance(outputs, tuple)
            result = [outputs] if single else list(outputs)
            present = [i for i, o in enumerate(result) if isinstance(o, torch.Tensor)]
            if present:
                # results that seem to need a gradient, whose grad_fn raises the message
                marked = refuse.apply(*[result[i].detach().requires_grad_() for i in present])
                for i, tensor in zip(present, marked if isinstance(marked, tuple) else (marked,)):
                    result[i] = tensor
            return result[0] if single else tuple(result)

        return wrapper

    return decorate
