"""filtered_conv2d against the slow float64 reference of tests/helpers/reference.py."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import torch.nn.functional as F

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.ops.conv import filtered_conv2d
from tests.helpers.reference import reference_grads

# (N, Cin, Cout, H, W, k, stride, padding, dilation, groups, r, bias)
CASES = {
    "dense_3x3_same": (2, 3, 4, 8, 8, 3, 1, 1, 1, 1, 2, True),
    "overhang_odd_map": (2, 3, 5, 7, 9, 3, 1, 1, 1, 1, 2, True),
    "r4_overhang": (1, 2, 3, 10, 11, 3, 1, 1, 1, 1, 4, False),
    "stride2": (2, 3, 4, 9, 8, 3, 2, 1, 1, 1, 2, True),
    "stride2_1x1": (2, 4, 6, 8, 8, 1, 2, 0, 1, 1, 2, False),
    "tuple_stride_padding": (1, 2, 3, 9, 10, (3, 5), (2, 1), (1, 2), 1, 1, 2, True),
    "valid_negative_grid": (2, 3, 2, 9, 9, 3, 1, "valid", 1, 1, 2, True),
    "same_string": (1, 3, 3, 7, 6, 3, 1, "same", 1, 1, 3, False),
    "same_even_kernel": (1, 2, 3, 8, 8, 4, 1, "same", 1, 1, 2, True),
    "depthwise": (2, 4, 4, 8, 8, 3, 1, 1, 1, 4, 2, True),
    "depth_multiplier": (2, 3, 6, 8, 7, 3, 1, 1, 1, 3, 2, False),
    "groups2": (1, 4, 6, 6, 6, 3, 1, 1, 1, 2, 2, True),
    "dilation_below_r": (1, 3, 4, 10, 10, 3, 1, 2, 2, 1, 3, True),
    "atrous": (1, 3, 4, 12, 12, 3, 1, 4, 4, 1, 2, True),
    "atrous_r3_d6": (1, 2, 3, 12, 13, 3, 1, 6, 6, 1, 3, False),
    "atrous_one_axis": (1, 2, 3, 12, 12, 3, 1, (4, 1), (4, 1), 1, 2, True),
    "atrous_even_kernel": (1, 2, 2, 12, 12, 2, 1, 2, 4, 1, 2, False),
    "atrous_depthwise": (1, 4, 4, 12, 12, 3, 1, 4, 4, 4, 2, False),
    "kernel5_stride3": (1, 2, 3, 14, 13, 5, 3, 2, 1, 1, 2, True),
    "map_smaller_than_r": (1, 2, 2, 3, 3, 3, 1, 1, 1, 1, 4, True),
}


def _random_case(seed: int):
    rnd = random.Random(seed)
    groups = rnd.choice([1, 1, 2, 3])
    c_in = groups * rnd.randint(1, 3)
    c_out = groups * rnd.randint(1, 3)
    k = (rnd.choice([1, 2, 3, 5]), rnd.choice([1, 3]))
    stride = (rnd.choice([1, 2]), rnd.choice([1, 2, 3]))
    dilation = (rnd.choice([1, 2, 4]), rnd.choice([1, 3]))
    padding = (rnd.randint(0, 3), rnd.randint(0, 3))
    r = rnd.choice([2, 3, 4])
    h = max(rnd.randint(9, 16), (k[0] - 1) * dilation[0] + 1)
    w = max(rnd.randint(9, 16), (k[1] - 1) * dilation[1] + 1)
    return (rnd.randint(1, 2), c_in, c_out, h, w, k, stride, padding, dilation, groups, r, rnd.random() < 0.5)


ALL_CASES = list(CASES.items()) + [(f"random_{s}", _random_case(s)) for s in range(25)]


def _make(case, dtype=torch.float64, seed=0):
    n, c_in, c_out, h, w, k, stride, padding, dilation, groups, r, bias = case
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=dtype)
    wt = torch.randn(c_out, c_in // groups, *k, generator=g, dtype=dtype)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return x, wt, b, kwargs, r


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("stride_correction", [True, False])
@pytest.mark.parametrize("name,case", ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_gradients_match_reference(name, case, stride_correction, backend):
    x, w, b, kwargs, r = _make(case)
    leaves = [t.clone().requires_grad_() for t in (x, w)] + ([b.clone().requires_grad_()] if b is not None else [])
    y = filtered_conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None, **kwargs, r=r,
                        stride_correction=stride_correction)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    y.backward(gy)
    ref_x, ref_w, ref_b = reference_grads(
        x, w, b, gy, stride=_pair(kwargs["stride"]), padding=kwargs["padding"],
        dilation=_pair(kwargs["dilation"]), groups=kwargs["groups"], r=r, stride_correction=stride_correction,
    )
    torch.testing.assert_close(leaves[0].grad, ref_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(leaves[1].grad, ref_w, rtol=1e-10, atol=1e-10)
    if b is not None:
        torch.testing.assert_close(leaves[2].grad, ref_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,case", list(CASES.items()), ids=list(CASES))
def test_forward_is_exactly_conv2d(name, case):
    x, w, b, kwargs, r = _make(case, dtype=torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.equal(filtered_conv2d(x, w, b, **kwargs, r=r), F.conv2d(x, w, b, **kwargs))


@pytest.mark.parametrize("name", ["dense_3x3_same", "stride2", "depthwise", "atrous"])
def test_r1_is_vanilla_backprop(name):
    x, w, b, kwargs, _ = _make(CASES[name])
    a = [t.clone().requires_grad_() for t in (x, w, b)]
    v = [t.clone().requires_grad_() for t in (x, w, b)]
    gy = torch.randn_like(F.conv2d(x, w, b, **kwargs))
    filtered_conv2d(*a, **kwargs, r=1).backward(gy)
    F.conv2d(*v, **kwargs).backward(gy)
    for got, want in zip(a, v):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_stride_correction_scales_by_stride_product():
    x, w, b, kwargs, r = _make(CASES["tuple_stride_padding"])
    grads = {}
    for corr in (True, False):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        filtered_conv2d(xx, ww, None, **kwargs, r=r, stride_correction=corr).sum().backward()
        grads[corr] = (xx.grad, ww.grad)
    torch.testing.assert_close(grads[False][0], grads[True][0] * 2)
    torch.testing.assert_close(grads[False][1], grads[True][1] * 2)


def test_input_is_not_kept_for_backward():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = filtered_conv2d(x, w, b, padding=1, r=2)
    assert kept, "the op must save something for backward"
    for t in kept:
        assert t.data_ptr() != x.data_ptr()
        assert t.shape != x.shape
    non_params = [t for t in kept if t.data_ptr() != w.data_ptr()]
    assert [tuple(t.shape) for t in non_params] == [(2, 3, 8, 8)]
    # nothing derived from the weight (e.g. a summed kernel) is kept
    assert all(t.shape != (4, 3) for t in kept)
    y.sum().backward()


def test_nothing_pooled_when_weight_is_frozen():
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = filtered_conv2d(x, w, padding=1, r=2)
    assert all(t is None or t.data_ptr() == w.data_ptr() for t in kept)
    y.sum().backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_close_to_float64(dtype, backend):
    x, w, b, kwargs, r = _make(CASES["stride2"])
    gy = torch.randn(F.conv2d(x, w, b, **kwargs).shape, dtype=torch.float64)
    ref = reference_grads(x, w, b, gy, stride=(2, 2), padding=1, dilation=(1, 1), groups=1, r=r,
                          stride_correction=True)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    y = filtered_conv2d(*leaves, **kwargs, r=r)
    assert y.dtype == dtype
    y.backward(gy.to(dtype))
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    for got, want in zip(leaves, ref):
        assert got.grad.dtype == dtype
        torch.testing.assert_close(got.grad.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_channels_last_input_gets_channels_last_grad(backend):
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    filtered_conv2d(x, w, padding=1, r=2).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_double_backward_is_refused():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(filtered_conv2d(x, w, padding=1, r=2).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|once_differentiable|twice"):
        gx.sum().backward()


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_r_is_refused(bad):
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        filtered_conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), r=bad)


@pytest.mark.parametrize("bad", [dict(stride=True), dict(dilation=(1, True)), dict(padding=False), dict(stride=0)])
def test_bad_conv_arguments_are_refused(bad):
    """Also after the same conv with the int values was cached (True == 1 as a key)."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(2, 2, 3, 3, requires_grad=True)
    filtered_conv2d(x, w, stride=1, padding=0, dilation=1, r=2)
    with pytest.raises(ValueError, match="must be"):
        filtered_conv2d(x, w, **{**dict(stride=1, padding=0, dilation=1), **bad}, r=2)


def test_parallel_branches_share_one_pooled_copy():
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    w1 = torch.randn(3, 4, 1, 1, requires_grad=True)
    w2 = torch.randn(3, 4, 3, 3, requires_grad=True)
    h = x * 1.0  # a non-leaf tensor read by two branches, like ASPP's input
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = filtered_conv2d(h, w1, r=2) + filtered_conv2d(h, w2, padding=4, dilation=4, r=2)
    pooled = {t.untyped_storage().data_ptr() for t in kept if t.shape == (2, 4, 6, 6)}
    assert len(pooled) == 1
    y.sum().backward()
    # the same gradients as two independent calls
    grads = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    (filtered_conv2d(x * 1.0, w1, r=2) + filtered_conv2d(x * 1.0, w2, padding=4, dilation=4, r=2)).sum().backward()
    for got, t in zip(grads, (x, w1, w2)):
        torch.testing.assert_close(got, t.grad)


def test_pooled_copy_is_recomputed_after_in_place_change():
    h = torch.randn(1, 2, 8, 8)
    w = torch.randn(2, 2, 1, 1, requires_grad=True)
    filtered_conv2d(h, w, r=2).sum().backward()
    first = w.grad.clone()
    w.grad = None
    h.mul_(2)
    filtered_conv2d(h, w, r=2).sum().backward()
    torch.testing.assert_close(w.grad, 2 * first)


@pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")
def test_the_route_each_conv_takes_is_logged_once_with_why(caplog):
    from lightning_gf.config import force_backend

    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    cases = {
        "node": (torch.randn(2, 4, 9, 9), dict(padding=1), "takes the compiled C++ node"),
        "channels_last": (torch.randn(2, 4, 10, 10).contiguous(memory_format=torch.channels_last), dict(padding=1),
                          "the C++ node declines: the input is not contiguous NCHW"),
        "atrous": (torch.randn(2, 4, 11, 11), dict(padding=2, dilation=2), "atrous taps keep their shape"),
        "same": (torch.randn(2, 4, 12, 12), dict(padding="same"), "padding='same' (the node takes numeric padding)"),
    }
    with caplog.at_level(logging.DEBUG, logger="lightning_gf.ops.conv"):
        for x, kwargs, _ in cases.values():
            for _ in range(3):  # said once, not per call
                filtered_conv2d(x.requires_grad_(), w, **kwargs, r=2)
        with force_backend("reference"):
            filtered_conv2d(torch.randn(2, 4, 13, 13, requires_grad=True), w, padding=1, r=2)
    messages = [r.getMessage() for r in caplog.records if r.name == "lightning_gf.ops.conv"]
    for name, (x, _, expected) in cases.items():
        said = [m for m in messages if f"input {tuple(x.shape)}" in m]
        assert len(said) == 1 and expected in said[0], (name, said)
    assert any("(2, 4, 13, 13)" in m and "backend pinned: reference" in m for m in messages)
