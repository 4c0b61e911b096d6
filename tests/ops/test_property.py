"""Property-based test: filtered_conv2d against the slow float64 reference over random configurations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gf.config import force_backend
from lightning_gf.ops.conv import filtered_conv2d
from tests.conftest import available_backends
from tests.helpers.reference import reference_grads


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3]))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    dh, dw = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2]))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 2))
    h = draw(st.integers((kh - 1) * dh + 1, (kh - 1) * dh + 12))  # at least the dilated kernel
    w = draw(st.integers((kw - 1) * dw + 1, (kw - 1) * dw + 12))
    return {
        "n": draw(st.integers(1, 2)), "c_in": c_in, "c_out": c_out, "k": (kh, kw), "size": (h, w),
        "stride": (sh, sw), "padding": (ph, pw), "dilation": (dh, dw), "groups": groups,
        "r": draw(st.integers(2, 5)), "bias": draw(st.booleans()), "stride_correction": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)), "backend": draw(st.sampled_from(available_backends())),
    }


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_filtered_conv2d_matches_the_reference(cfg):
    with force_backend(cfg["backend"]):
        _check_against_reference(cfg)
    

def _check_against_reference(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["n"], cfg["c_in"], *cfg["size"], generator=g, dtype=torch.float64)
    w = torch.randn(cfg["c_out"], cfg["c_in"] // cfg["groups"], *cfg["k"], generator=g, dtype=torch.float64)
    b = torch.randn(cfg["c_out"], generator=g, dtype=torch.float64) if cfg["bias"] else None
    conv = dict(stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"], groups=cfg["groups"])
    leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = filtered_conv2d(*leaves[:2], leaves[2] if b is not None else None, **conv, r=cfg["r"],
                        stride_correction=cfg["stride_correction"])
    assert torch.equal(y, F.conv2d(x, w, b, **conv))  # the forward is exact
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(gy)
    want = reference_grads(x, w, b, gy, **conv, r=cfg["r"], stride_correction=cfg["stride_correction"])
    for leaf, expected in zip(leaves, want):
        torch.testing.assert_close(leaf.grad, expected)
