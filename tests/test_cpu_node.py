"""The compiled CPU autograd node (``csrc/filtered_conv.cpp``) against the Python
``autograd.Function`` it stands in for: same output, same gradients, same errors."""

from __future__ import annotations

import pytest
import torch

from lightning_gf import cpu_kernels, functional
from lightning_gf.functional import filtered_conv2d
from tests.conftest import cpu_path_forced

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")

NODE = "torch::autograd::CppNode<lightning_gf::FilteredConv2d>"

# (N, C_in, C_out, H, W, k, stride, padding, groups, r): dense, depthwise, 1x1, strided,
# strided 1x1, grids that overhang the map
CASES = [(2, 3, 5, 8, 8, 3, 1, 1, 1, 2), (2, 4, 4, 9, 7, 3, 1, 1, 4, 2), (1, 6, 4, 10, 11, 1, 1, 0, 1, 4),
         (2, 3, 4, 9, 8, 3, 2, 1, 1, 2), (2, 8, 6, 14, 14, 1, 2, 0, 1, 2), (1, 2, 3, 3, 3, 3, 1, 1, 1, 4),
         (2, 5, 5, 14, 14, 3, 2, 1, 5, 4)]


def _run(case, dtype, needs, bias, stride_correction, node):
    """y and the gradients asked for, through the node or through the Python function."""
    n, c_in, c_out, h, w, k, stride, padding, groups, r = case
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype).requires_grad_(needs[0])
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g).to(dtype).requires_grad_(needs[1])
    b = torch.randn(c_out, generator=g).to(dtype).requires_grad_(needs[2]) if bias else None
    with pytest.MonkeyPatch.context() as patch:
        if not node:
            patch.setattr(functional, "_cpu_node_takes", lambda *args: False)
        y = filtered_conv2d(x, weight, b, stride=stride, padding=padding, groups=groups, r=r,
                            stride_correction=stride_correction)
    assert (y.grad_fn.name() == NODE) == node
    wanted = [t for t, need in zip((x, weight, b), needs) if need and t is not None]
    gy = torch.randn(y.shape, generator=g).to(dtype)
    return y, torch.autograd.grad(y, wanted, gy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("case", CASES)
def test_node_matches_the_python_function(case, needs, dtype):
    """Bit for bit: both run ``conv2d`` forward and the same compiled backward."""
    y_node, grads_node = _run(case, dtype, needs, True, True, node=True)
    y_python, grads_python = _run(case, dtype, needs, True, True, node=False)
    assert torch.equal(y_node, y_python)
    assert len(grads_node) == len(grads_python) == sum(needs)
    for got, want in zip(grads_node, grads_python):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]])
def test_node_without_bias_and_without_stride_correction(case):
    y_node, grads_node = _run(case, torch.float64, (True, True, False), False, False, node=True)
    y_python, grads_python = _run(case, torch.float64, (True, True, False), False, False, node=False)
    assert torch.equal(y_node, y_python)
    for got, want in zip(grads_node, grads_python):
        assert torch.equal(got, want)


def _grad_fn_name(x, w, **conv):
    return filtered_conv2d(x, w, **conv).grad_fn.name()


def test_node_takes_only_the_convs_its_backward_covers():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    dense, grouped, depthwise = torch.randn(4, 4, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 1, 3, 3)
    assert _grad_fn_name(x, dense, padding=1, r=2) == NODE
    assert _grad_fn_name(x, depthwise, padding=1, groups=4, r=2) == NODE
    assert _grad_fn_name(x, grouped, padding=1, groups=2, r=2) != NODE  # 2 groups of 2 channels
    assert _grad_fn_name(x, dense, padding=2, dilation=2, r=2) != NODE  # dilation >= r: taps kept
    assert _grad_fn_name(x, dense, padding="same", r=2) != NODE
    assert _grad_fn_name(x.to(memory_format=torch.channels_last), dense, padding=1, r=2) != NODE
    assert _grad_fn_name(x[:, :, ::2], dense, padding=1, r=2) != NODE  # a strided view
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _grad_fn_name(x, dense, padding=1, r=2) != NODE
    with cpu_path_forced("plain"):  # kernels off
        assert _grad_fn_name(x, dense, padding=1, r=2) != NODE


@pytest.mark.parametrize("node", [True, False])
def test_create_graph_gives_the_gradients_and_refuses_a_second_backward(node, monkeypatch):
    if not node:
        monkeypatch.setattr(functional, "_cpu_node_takes", lambda *args: False)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    y = filtered_conv2d(x, w, b, padding=1, r=2)
    assert (y.grad_fn.name() == NODE) == node
    once = torch.autograd.grad(y.pow(2).sum(), (x, w, b), retain_graph=True)
    graphed = torch.autograd.grad(y.pow(2).sum(), (x, w, b), create_graph=True)
    for got, want in zip(graphed, once):
        assert got.requires_grad
        assert torch.equal(got.detach(), want)
    for grad in graphed:
        with pytest.raises(RuntimeError, match=r"lightning_gf: a filtered conv has no double backward.*exclude="):
            grad.sum().backward(retain_graph=True)


def test_node_shares_one_pooled_input_between_readers():
    """Two filtered convs reading one tensor (ASPP branches) keep one pooled copy between them."""
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w1, w2 = torch.randn(3, 4, 3, 3, requires_grad=True), torch.randn(5, 4, 1, 1, requires_grad=True)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y1 = filtered_conv2d(x, w1, padding=1, r=2)
        y2 = filtered_conv2d(x, w2, r=2)
    assert y1.grad_fn.name() == y2.grad_fn.name() == NODE
    pooled = [t for t in kept if t.shape[2:] == (4, 4)]
    assert len(pooled) == 2 and pooled[0].data_ptr() == pooled[1].data_ptr()
    assert all(t.shape != x.shape for t in kept)  # never the input itself
    (y1.sum() + y2.sum()).backward()
    assert x.grad is not None and w1.grad is not None and w2.grad is not None


def test_node_runs_under_no_grad_and_inference_mode():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3, requires_grad=True)
    want = torch.nn.functional.conv2d(x, w, padding=1)
    with torch.no_grad():
        assert torch.equal(filtered_conv2d(x, w, padding=1, r=2), want)
        assert not hasattr(x, "_gf_pooled") or not functional._reads_of(x)  # nothing pooled without grad
    with torch.inference_mode():
        assert torch.equal(filtered_conv2d(x, w, padding=1, r=2), want)
