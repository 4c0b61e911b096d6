"""torch.compile: no graph break at the filtered op or the lean modules, same gradients as eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from lightning_gf import apply_gradient_filter


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.ReLU6(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
    )


@pytest.mark.parametrize("lean,dynamic", [(False, False), (True, False), (True, True)])
def test_compiles_in_one_graph_with_eager_gradients(lean, dynamic):
    # dynamic: the lean BatchNorm's fake kernel once hashed symbolic sizes into a cache
    x = torch.randn(2, 3, 16, 16)
    model = _net()
    apply_gradient_filter(model, r=2, depth=3, example_input=x[:1], lean=lean)
    model.train()
    eager = copy.deepcopy(model)
    dynamo.reset()
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out = compiled(x)
    torch.testing.assert_close(out, eager(x))
    if dynamic:  # another batch and map size, the same graph
        other = torch.randn(3, 3, 20, 20)
        torch.testing.assert_close(compiled(other), eager(other))
    out.pow(2).sum().backward()
    eager(x).pow(2).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    dynamo.reset()


def test_compiles_in_one_graph_before_any_eager_call():
    """A fresh process that compiles first: the kernels' lazy load (and its lock) stays out
    of the traced graph."""
    import subprocess
    import sys

    code = (
        "import torch, torch._dynamo as dynamo\n"
        "from lightning_gf.ops.conv import filtered_conv2d\n"
        "x, w = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)\n"
        "explained = dynamo.explain(lambda x, w: filtered_conv2d(x, w, padding=1, r=2).sum())(x, w)\n"
        "print(explained.graph_break_count, explained.graph_count)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "1"]
