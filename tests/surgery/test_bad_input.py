"""Bad input to apply_gradient_filter and the callback: a clear error, and the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gf import GradientFilterCallback, apply_gradient_filter
from lightning_gf.surgery.tracing import ExampleInputError
from tests.helpers.models import TinyCNN

X = torch.randn(1, 3, 16, 16)


def _snapshot(model: nn.Module):
    return (
        [(n, type(m), m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def _assert_unchanged(model, snap):
    now = _snapshot(model)
    assert now[0] == snap[0] and now[1] == snap[1]
    assert now[2].keys() == snap[2].keys()
    assert all(torch.equal(now[2][k], snap[2][k]) for k in now[2])


BAD = [
    (dict(r=0), ValueError, r"r must be an int >= 1"),
    (dict(r=-2), ValueError, r"r must be an int >= 1"),
    (dict(r=2.5), ValueError, r"r must be an int >= 1"),
    (dict(r=True), ValueError, r"r must be an int >= 1"),
    (dict(r={"last.*": 0}), ValueError, r"r\['last.\*'\] must be an int >= 1"),
    (dict(r={}), ValueError, r"r mapping is empty"),
    (dict(depth=0), ValueError, r"depth must be an int >= 1"),
    (dict(depth=1.0), ValueError, r"depth must be an int >= 1"),
    (dict(depth=4), ValueError, r"depth=4 but the model has only 3 eligible Conv2d layers.*lower depth to 3"),
    (dict(r={"nothing.*": 2}), ValueError, r"r pattern 'nothing.\*' matches no nn.Conv2d"),
    (dict(include=["nope"]), ValueError, r"include pattern 'nope' matches no nn.Conv2d"),
    (dict(exclude=["nope"]), ValueError, r"exclude pattern 'nope' matches no nn.Conv2d"),
    (dict(example_input=None), ValueError, r"no example input: pass example_input="),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_raise_and_leave_model_unchanged(kwargs, exc, match):
    model = TinyCNN()
    model.train()
    snap = _snapshot(model)
    args = dict(r=2, depth=1, example_input=X)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        apply_gradient_filter(model, **args)
    _assert_unchanged(model, snap)


def test_model_without_conv():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with pytest.raises(ValueError, match="the model has no nn.Conv2d layer"):
        apply_gradient_filter(model, example_input=X)


def test_installing_twice_is_refused():
    model = TinyCNN()
    apply_gradient_filter(model, r=2, depth=1, example_input=X)
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="already has a gradient filter installed.*handle.remove"):
        apply_gradient_filter(model, r=2, depth=1, example_input=X)
    _assert_unchanged(model, snap)


def test_failing_example_forward_leaves_model_unchanged():
    model = TinyCNN()
    model.train()
    snap = _snapshot(model)
    with pytest.raises(ExampleInputError, match=r"forward failed on the example input \(a tensor of shape "
                       r"\(1, 5, 16, 16\)\): RuntimeError") as info:
        apply_gradient_filter(model, r=2, depth=1, example_input=torch.randn(1, 5, 16, 16))
    assert isinstance(info.value.__cause__, RuntimeError)  # the forward's own error, chained
    _assert_unchanged(model, snap)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        apply_gradient_filter(lambda x: x, example_input=X)


@pytest.mark.parametrize("kwargs,match", [(dict(r=0), "r must be"), (dict(depth=0), "depth must be"),
                                          (dict(r={"a": 1.5}), r"r\['a'\] must be")])
def test_callback_checks_its_arguments_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientFilterCallback(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=0), r"stride must be a positive int or a pair of them, got 0"),
    (dict(stride=(1, 2, 3)), r"stride must be .* got \(1, 2, 3\)"),
    (dict(stride=[[1], 1]), r"stride must be .* got \[\[1\], 1\]"),  # unhashable: checked without the cache
    (dict(dilation=1.5), r"dilation must be a positive int"),
    (dict(padding=-1), r"padding must be 'same', 'valid', a non-negative int or a pair of them, got -1"),
    (dict(padding={"h": 1}), r"padding must be .* got \{'h': 1\}"),
])
def test_filtered_conv2d_checks_its_conv_arguments(kwargs, match):
    from lightning_gf.ops.conv import filtered_conv2d

    x, w = torch.randn(1, 2, 8, 8, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)
    for _ in range(2):  # the second call is not answered from the cache of good arguments
        with pytest.raises(ValueError, match=match):
            filtered_conv2d(x, w, **kwargs, r=2)


def test_filtered_conv2d_takes_lists_as_tuples():
    from lightning_gf.ops.conv import filtered_conv2d

    x, w = torch.randn(1, 2, 9, 9, requires_grad=True), torch.randn(3, 2, 3, 3, requires_grad=True)
    y_list = filtered_conv2d(x, w, stride=[2, 1], padding=[1, 0], dilation=[1, 2], r=2)
    y_tuple = filtered_conv2d(x, w, stride=(2, 1), padding=(1, 0), dilation=(1, 2), r=2)
    assert torch.equal(y_list, torch.nn.functional.conv2d(x, w, stride=(2, 1), padding=(1, 0), dilation=(1, 2)))
    assert torch.equal(y_list, y_tuple)
    gl = torch.autograd.grad(y_list.sum(), (x, w))
    gt = torch.autograd.grad(y_tuple.sum(), (x, w))
    assert all(torch.equal(a, b) for a, b in zip(gl, gt))
