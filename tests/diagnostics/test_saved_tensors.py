"""SavedTensorMeter and StepProfiler: what they measure, and that measuring frees what it saw."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from lightning_gf import apply_gradient_filter
from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter
from tests.helpers.models import TinyCNN


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())


def _filtered_model():
    torch.manual_seed(0)
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=torch.randn(1, 3, 16, 16), lean=False)
    return model.train(), handle


@pytest.mark.parametrize("nested", [False, True])
def test_a_metered_forward_without_backward_frees_its_graph(nested):
    # When the meters handed autograd back the very tensors it saved, a filtered model's
    # forward that was never backpropagated kept its graph: gc could not free it.
    model, handle = _filtered_model()
    x = torch.randn(2, 3, 16, 16)
    model(x)  # caches the filter builds once (patch counts) are not what this test looks for
    handle.reset_stats()
    before = _live_tensors()
    with SavedTensorMeter() as outer, (SavedTensorMeter() if nested else contextlib.nullcontext()) as inner:
        out = model(x)
    assert outer.total_bytes > 0
    if nested:
        assert inner.total_bytes == outer.total_bytes
    assert handle.stats.kept_bytes > 0  # the filter ran and kept its pooled sums
    del out
    assert _live_tensors() == before


def test_nested_meters_both_measure_and_an_isolated_one_takes_its_tensors_alone():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    outer, inner, side, later = (SavedTensorMeter(isolated=i == 2) for i in range(4))
    for meter in (outer, inner, side, later):
        meter.skip_parameters_of(conv)
    with outer:
        with inner:
            a = conv(x)
        with side:
            b = conv(x * 2)  # the mul saves nothing (a constant factor); the conv saves its new input
    x_bytes = x.numel() * 4
    assert inner.total_bytes == x_bytes
    assert side.total_bytes == x_bytes  # (x * 2), a storage of its own
    assert outer.total_bytes == x_bytes  # x only: the isolated meter's tensors are not the outer's
    # all hooks are gone: a forward now is not measured by anyone
    with later:
        pass
    conv(x)
    assert later.total_bytes == 0 and outer.total_bytes == x_bytes
    del a, b


def test_metered_gradients_equal_unmetered_ones():
    model, _ = _filtered_model()
    x = torch.randn(2, 3, 16, 16)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    with SavedTensorMeter():
        out = model(x)
    out.square().sum().backward()
    metered = [p.grad for p in model.parameters() if p.requires_grad]
    for a, b in zip(plain, metered):
        torch.testing.assert_close(a, b)  # the same up to float32 rounding of the kernels
