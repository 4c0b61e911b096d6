"""The compiled CPU autograd node (``csrc/filtered_conv.cpp``) against the Python
``autograd.Function`` it stands in for: same output, same gradients, same errors."""

from __future__ import annotations

import pytest
import torch

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.config import force_backend
from lightning_gf.ops import conv as functional
from lightning_gf.ops.conv import filtered_conv2d

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")

NODE = "torch::autograd::CppNode<lightning_gf::FilteredConv2d>"

# (N, C_in, C_out, H, W, k, stride, padding, groups, r): dense, depthwise, 1x1, strided,
# strided 1x1, grids that overhang the map
CASES = [(2, 3, 5, 8, 8, 3, 1, 1, 1, 2), (2, 4, 4, 9, 7, 3, 1, 1, 4, 2), (1, 6, 4, 10, 11, 1, 1, 0, 1, 4),
         (2, 3, 4, 9, 8, 3, 2, 1, 1, 2), (2, 8, 6, 14, 14, 1, 2, 0, 1, 2), (1, 2, 3, 3, 3, 3, 1, 1, 1, 4),
         (2, 5, 5, 14, 14, 3, 2, 1, 5, 4)]


def _force_python_function(patch: pytest.MonkeyPatch) -> None:
    """Send filtered convs to the Python ``autograd.Function``: no conv gets a plan for the
    node, and the plans recorded for earlier calls are out of sight."""
    patch.setattr(functional, "_node_plan", lambda *args: functional._NO_NODE)
    patch.setattr(functional, "_NODE_PLANS", {})


def _run(case, dtype, needs, bias, stride_correction, node):
    """y and the gradients asked for, through the node or through the Python function."""
    n, c_in, c_out, h, w, k, stride, padding, groups, r = case
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype).requires_grad_(needs[0])
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g).to(dtype).requires_grad_(needs[1])
    b = torch.randn(c_out, generator=g).to(dtype).requires_grad_(needs[2]) if bias else None
    with pytest.MonkeyPatch.context() as patch:
        if not node:
            _force_python_function(patch)
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
    with force_backend("reference"):  # kernels off
        assert _grad_fn_name(x, dense, padding=1, r=2) != NODE


@pytest.mark.parametrize("node", [True, False])
def test_create_graph_gives_the_gradients_and_refuses_a_second_backward(node, monkeypatch):
    if not node:
        _force_python_function(monkeypatch)
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
        assert not hasattr(x, "_gf_pooled") or not functional._reads_of(x).pooled  # nothing pooled without grad
    with torch.inference_mode():
        assert torch.equal(filtered_conv2d(x, w, padding=1, r=2), want)


def _plan_key(x, w, stride=1, padding=0, dilation=1, groups=1, r=2, stride_correction=True):
    return (x.shape, x.dtype, w.shape, stride, padding, dilation, groups, r, stride_correction,
            type(stride), type(padding), type(dilation), type(groups), torch.backends.mkldnn.enabled)


def _counts(stats):
    return stats.kept_bytes, stats.vanilla_bytes, stats.backward_macs_vanilla, stats.backward_macs_filtered


@pytest.mark.parametrize("case", CASES)
def test_a_recorded_plan_gives_what_the_first_call_gave(case, monkeypatch):
    """The first call records the conv's plan; the second goes straight to the node with it:
    same output, same gradients, same statistics."""
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    n, c_in, c_out, h, w, k, stride, padding, groups, r = case
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, c_in, h, w, generator=g, requires_grad=True)
    weight = torch.randn(c_out, c_in // groups, k, k, generator=g, requires_grad=True)
    b = torch.randn(c_out, generator=g, requires_grad=True)
    gy = torch.randn(filtered_conv2d(x, weight, b, stride=stride, padding=padding, groups=groups, r=r).shape,
                     generator=g)
    functional._NODE_PLANS.clear()
    results = []
    for _ in range(2):
        stats = functional.FilterStats()
        x_step = x.detach().clone().requires_grad_()  # a new input each step, as in training
        y = filtered_conv2d(x_step, weight, b, stride=stride, padding=padding, groups=groups, r=r, _stats=stats)
        assert y.grad_fn.name() == NODE
        results.append((y, torch.autograd.grad(y, (x_step, weight, b), gy), _counts(stats)))
        assert list(functional._NODE_PLANS) == [_plan_key(x, weight, stride, padding, 1, groups, r)]
    (y1, grads1, counts1), (y2, grads2, counts2) = results
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(grads1, grads2))
    assert counts1 == counts2 and counts1[0] > 0


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_statistics_through_plans_match_the_python_function(needs, monkeypatch):
    """Kept bytes and work of three readers of one input, two of them on one grid (the
    second keeps nothing new), through recorded plans and through the Python function."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(needs[0])
    w1 = torch.randn(6, 4, 3, 3, generator=g).requires_grad_(needs[1])
    w2 = torch.randn(5, 4, 1, 1, generator=g).requires_grad_(needs[1])

    def three_readers():
        stats = functional.FilterStats()
        filtered_conv2d(x, w1, padding=1, r=2, _stats=stats)  # a 4x4 grid
        filtered_conv2d(x, w2, r=2, _stats=stats)  # the same 4x4 grid
        filtered_conv2d(x, w2, stride=2, r=2, _stats=stats)  # a 2x2 grid
        x._gf_pooled = None  # the next step's input
        return _counts(stats)

    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    first, planned = three_readers(), three_readers()
    assert len(functional._NODE_PLANS) == 3
    with pytest.MonkeyPatch.context() as patch:
        _force_python_function(patch)
        python = three_readers()
    assert first == planned == python
    pooled_copies = 2 * 4 * (16 + 4) * 4  # float32 sums: one 4x4 copy shared, one 2x2 copy
    assert python[0] == (pooled_copies if needs[1] else 0)
    assert python[1] == (x.numel() * 4 if needs[1] else 0)  # a plain conv keeps x once for all readers
    assert python[2] > python[3] > 0


def test_plans_do_not_take_what_the_moment_forbids(monkeypatch):
    """A recorded plan is used only while the node could take the call anew: not for a
    channels-last input, under autocast or with the kernels off."""
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    assert _grad_fn_name(x, w, padding=1, r=2) == NODE
    assert _plan_key(x, w, padding=1) in functional._NODE_PLANS
    assert _grad_fn_name(x.to(memory_format=torch.channels_last), w, padding=1, r=2) != NODE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _grad_fn_name(x, w, padding=1, r=2) != NODE
    with force_backend("reference"):
        assert _grad_fn_name(x, w, padding=1, r=2) != NODE
    assert _grad_fn_name(x, w, padding=1, r=2) == NODE


def test_bools_are_refused_after_their_int_has_a_plan(monkeypatch):
    """``True == 1`` to a dict: the plans' keys hold the arguments' types, so ``stride=True``
    still meets the argument checks."""
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    x, w = torch.randn(1, 2, 6, 6, requires_grad=True), torch.randn(3, 2, 3, 3)
    filtered_conv2d(x, w, stride=1, padding=1, dilation=1, r=2)
    assert len(functional._NODE_PLANS) == 1
    for bad in (dict(stride=True, padding=1), dict(padding=True), dict(dilation=True, padding=1)):
        with pytest.raises(ValueError, match="stride|padding|dilation"):
            filtered_conv2d(x, w, r=2, **bad)


def test_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    monkeypatch.setattr(functional, "_MAX_NODE_PLANS", 3)
    w = torch.randn(2, 2, 3, 3)
    for size in range(6, 12):
        filtered_conv2d(torch.randn(1, 2, size, size, requires_grad=True), w, padding=1, r=2)
        assert 1 <= len(functional._NODE_PLANS) <= 3
    assert _plan_key(torch.empty(1, 2, 11, 11), w, padding=1) in functional._NODE_PLANS
