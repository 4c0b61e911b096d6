"""SavedTensorMeter and StepProfiler: what they measure, and that measuring frees what it saw."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_gf import apply_gradient_filter
from lightning_gf.saved_tensors import SavedTensorMeter
from lightning_gf.step_profiler import StepProfiler
from tests.models import TinyCNN


def _live_tensors() -> int:
    gc.collect()
    return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())


def _filtered_model():
    torch.manual_seed(0)
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=torch.randn(1, 3, 16, 16), lean=False)
    return model.train(), handle


@pytest.mark.parametrize("pack", ["meter", "profiler"])
def test_a_metered_forward_without_backward_frees_its_graph(pack):
    # When the meters handed autograd back the very tensors it saved, a filtered model's
    # forward that was never backpropagated kept its graph: gc could not free it.
    model, handle = _filtered_model()
    x = torch.randn(2, 3, 16, 16)
    model(x)  # caches the filter builds once (patch counts) are not what this test looks for
    handle.reset_stats()
    before = _live_tensors()
    if pack == "meter":
        meter = SavedTensorMeter()
        with meter:
            out = model(x)
        assert meter.total_bytes > 0
    else:
        profiler = StepProfiler()
        profiler._pending = type("P", (), {"storages": {}})()
        with torch.autograd.graph.saved_tensors_hooks(profiler._pack, lambda t: t):
            out = model(x)
        assert sum(profiler._pending.storages.values()) > 0
    assert handle.stats.kept_bytes > 0  # the filter ran and kept its pooled sums
    del out
    assert _live_tensors() == before


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
