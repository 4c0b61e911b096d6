"""lightning_gf's own depthwise conv (``csrc/depthwise_conv.cpp``) against PyTorch's: the
same bits on every shape, and the filtered node uses it only after checking that."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.ops import conv as functional
from lightning_gf.ops.conv import filtered_conv2d

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")

NODE = "torch::autograd::CppNode<lightning_gf::FilteredConv2d>"


def _own(x, w, b, padding, dilation, stride=1):
    conv = [stride, stride, padding[0], padding[1], dilation[0], dilation[1]]
    return functional._own_depthwise_conv2d(x, w, b, conv, x.shape[1])


def _pytorch(x, w, b, padding, dilation, stride=1):
    return F.conv2d(x, w, b, stride, padding, dilation, x.shape[1])


# (N, C, H, W, k, padding, dilation, bias): the benchmark's and the models' layers, maps
# narrower than a register (one output column, three, seven), exactly one and just over
# one register wide, the widths where the kernel switches from strips to row blocks
# (16, 17, 28), 5x5 and 7x7 kernels, dilation, uneven padding
SHAPES = [
    (8, 960, 7, 7, 3, (1, 1), (1, 1), True), (2, 144, 56, 56, 3, (1, 1), (1, 1), False),
    (1, 2, 3, 3, 3, (0, 0), (1, 1), True), (3, 5, 5, 5, 3, (0, 1), (1, 1), True), (2, 3, 9, 7, 3, (1, 1), (1, 1), True),
    (2, 4, 8, 8, 3, (1, 1), (1, 1), False), (2, 4, 9, 9, 3, (1, 1), (1, 1), True), (1, 6, 16, 16, 3, (1, 1), (1, 1), True),
    (1, 6, 17, 17, 3, (1, 1), (1, 1), True), (2, 8, 28, 28, 3, (1, 1), (1, 1), False),
    (2, 6, 14, 14, 5, (2, 2), (1, 1), True), (1, 7, 13, 20, 7, (3, 3), (1, 1), True),
    (2, 4, 19, 19, 3, (2, 2), (2, 2), True), (1, 5, 23, 17, 3, (4, 1), (3, 1), False),
    (1, 3, 12, 30, 5, (4, 0), (2, 1), True),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_own_conv_gives_pytorchs_bits(shape, threads):
    n, c, h, w, k, padding, dilation, bias = shape
    g = torch.Generator().manual_seed(sum(shape[:5]))
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(c, 1, k, k, generator=g)
    b = torch.randn(c, generator=g) if bias else None
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(_own(x, weight, b, padding, dilation), _pytorch(x, weight, b, padding, dilation))
    finally:
        torch.set_num_threads(previous)


def test_own_conv_gives_pytorchs_bits_on_random_shapes():
    """Random shapes, including those the own conv leaves to PyTorch (padding past 4 or as
    wide as the kernel, a kernel wider than the map, one channel), where oneDNN adds in
    another order: the op must hand those back, or they differ in the last bits."""
    rng = random.Random(7)
    tried = 0
    while tried < 250:
        k = rng.choice((3, 5, 7))
        dilation = (rng.choice((1, 1, 2, 3)), rng.choice((1, 1, 2, 3)))
        padding = (rng.randint(0, 6), rng.randint(0, 6))
        h, w, c, n = rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 12), rng.randint(1, 3)
        if min(h + 2 * padding[0] - dilation[0] * (k - 1), w + 2 * padding[1] - dilation[1] * (k - 1)) < 1:
            continue
        tried += 1
        x, weight = torch.randn(n, c, h, w), torch.randn(c, 1, k, k)
        b = torch.randn(c) if rng.random() < 0.7 else None
        own, want = _own(x, weight, b, padding, dilation), _pytorch(x, weight, b, padding, dilation)
        assert torch.equal(own, want), (n, c, h, w, k, padding, dilation, b is not None)


def test_own_conv_keeps_nan_and_inf_where_pytorch_does():
    x = torch.randn(2, 4, 7, 7)
    x[0, 1, 0, 0], x[1, 2, 3, 6], x[1, 3, 6, 6] = float("nan"), float("inf"), -float("inf")
    weight, b = torch.randn(4, 1, 3, 3), torch.randn(4)
    own, want = _own(x, weight, b, (1, 1), (1, 1)), _pytorch(x, weight, b, (1, 1), (1, 1))
    torch.testing.assert_close(own, want, rtol=0, atol=0, equal_nan=True)
    assert own.isnan().any()


@pytest.mark.parametrize("stride, dtype", [(2, torch.float32), (1, torch.float64)])
def test_what_the_own_conv_does_not_take_is_pytorchs_conv(stride, dtype):
    x, weight, b = torch.randn(2, 6, 9, 9, dtype=dtype), torch.randn(6, 1, 3, 3, dtype=dtype), torch.randn(6, dtype=dtype)
    own = _own(x, weight, b, (1, 1), (1, 1), stride=stride)
    assert torch.equal(own, _pytorch(x, weight, b, (1, 1), (1, 1), stride=stride))


def _depthwise_step(x, weight, b, gy):
    y = filtered_conv2d(x, weight, b, padding=1, groups=x.shape[1], r=2)
    assert y.grad_fn.name() == NODE
    return y, torch.autograd.grad(y, (x, weight, b), gy)


def _plans(x):
    return [plan for key, plan in functional._NODE_PLANS.items() if key[0] == x.shape]


def test_the_node_checks_then_uses_the_own_conv(monkeypatch):
    """After its first call a float32 depthwise conv's plan says own_conv; output and
    gradients are those of the node with PyTorch's conv, bit for bit (the pooled input
    that the own conv's pass makes is the same too)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 12, 12, generator=g, requires_grad=True)
    weight, b = torch.randn(8, 1, 3, 3, generator=g, requires_grad=True), torch.randn(8, generator=g, requires_grad=True)
    gy = torch.randn(2, 8, 12, 12, generator=g)
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    checks = []
    agrees = functional._own_conv_agrees
    monkeypatch.setattr(functional, "_own_conv_agrees", lambda *args: checks.append(1) or agrees(*args))
    own = [_depthwise_step(x, weight, b, gy) for _ in range(2)]
    assert len(checks) == 1 and [plan.own_conv for plan in _plans(x)] == [True]
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    monkeypatch.setattr(functional, "_own_conv_agrees", lambda *args: False)
    pytorch = _depthwise_step(x, weight, b, gy)
    assert [plan.own_conv for plan in _plans(x)] == [False]
    for y, grads in own:
        assert torch.equal(y, pytorch[0]) and torch.equal(y, F.conv2d(x, weight, b, padding=1, groups=8))
        assert all(torch.equal(got, want) for got, want in zip(grads, pytorch[1]))


def test_a_failed_check_keeps_pytorchs_conv(monkeypatch):
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    monkeypatch.setattr(functional, "_own_depthwise_conv2d", lambda x, w, *_: F.conv2d(x, w, padding=1, groups=8) + 1e-7)
    x, weight = torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(8, 1, 3, 3, requires_grad=True)
    y = filtered_conv2d(x, weight, padding=1, groups=8, r=2)
    assert [plan.own_conv for plan in _plans(x)] == [False]
    assert torch.equal(y, F.conv2d(x, weight, padding=1, groups=8))


def test_only_float32_depthwise_plans_ask(monkeypatch):
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    filtered_conv2d(x.double(), torch.randn(8, 1, 3, 3, dtype=torch.float64), padding=1, groups=8, r=2)
    filtered_conv2d(x, torch.randn(8, 8, 3, 3), padding=1, r=2)
    assert [plan.own_conv for plan in functional._NODE_PLANS.values()] == [False, False]


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_turning_onednn_off_makes_a_new_plan(monkeypatch):
    """Without oneDNN PyTorch runs another depthwise kernel: the plan is keyed on the switch,
    so the check runs again, and the output is PyTorch's either way."""
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    x, weight = torch.randn(2, 8, 12, 12, requires_grad=True), torch.randn(8, 1, 3, 3, requires_grad=True)
    assert torch.equal(filtered_conv2d(x, weight, padding=1, groups=8, r=2), F.conv2d(x, weight, padding=1, groups=8))
    with torch.backends.mkldnn.flags(enabled=False):
        y = filtered_conv2d(x, weight, padding=1, groups=8, r=2)
        assert torch.equal(y, F.conv2d(x, weight, padding=1, groups=8))
    assert sorted(key[-1] for key in functional._NODE_PLANS) == [False, True]


def test_parallel_readers_share_the_pooled_input_with_the_own_conv(monkeypatch):
    """The second reader of an input finds its pooled copy and runs the own conv alone."""
    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    w1, w2 = torch.randn(8, 1, 3, 3, requires_grad=True), torch.randn(8, 1, 5, 5, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y1 = filtered_conv2d(x, w1, padding=1, groups=8, r=2)
        y2 = filtered_conv2d(x, w2, padding=2, groups=8, r=2)
    assert [plan.own_conv for plan in functional._NODE_PLANS.values()] == [True, True]
    assert torch.equal(y1, F.conv2d(x, w1, padding=1, groups=8))
    assert torch.equal(y2, F.conv2d(x, w2, padding=2, groups=8))
    pooled = [t for t in kept if t.shape == (2, 8, 5, 5)]
    assert len(pooled) == 2 and pooled[0].data_ptr() == pooled[1].data_ptr()


def test_a_filtered_mobilenet_gives_the_plain_models_output(monkeypatch):
    """timm's mobilenetv2 with its last blocks filtered (depthwise 3x3 convs on 7x7 maps
    among them) trains with the plain model's forward, bit for bit."""
    timm = pytest.importorskip("timm")
    from lightning_gf import apply_gradient_filter

    monkeypatch.setattr(functional, "_NODE_PLANS", {})
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 96, 96)
    plain = copy.deepcopy(model).eval()  # BatchNorm in eval mode, as bn_eval keeps it
    apply_gradient_filter(model, r=2, depth=6, example_input=x)
    model.train()
    y = model(x)
    assert y.requires_grad
    assert torch.equal(y, plain(x))
    assert any(plan.own_conv for plan in functional._NODE_PLANS.values())
