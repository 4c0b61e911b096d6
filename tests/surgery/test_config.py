"""GradientFilterConfig (one checked set of options) and the backend switch (force_backend)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_gf import apply_gradient_filter, filtered_conv2d
from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.backends import small_maps
from lightning_gf.config import (
    BACKENDS,
    GradientFilterConfig,
    force_backend,
    get_backend,
    set_backend,
)
from tests.helpers.models import TinyCNN

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _saved_pooled_and_node(backend):
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    saved = []
    with force_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                          lambda t: t):
        y = filtered_conv2d(x, w, padding=1, r=2)
    pooled = [t for t in saved if t.shape == (2, 4, 4, 4)]
    return y.grad_fn, pooled


@pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")
def test_force_backend_pins_the_route_each_call_takes():
    node, pooled = _saved_pooled_and_node("cpu")
    assert type(node).__name__ == "CppFunction"  # the compiled node, forward and backward
    node, pooled = _saved_pooled_and_node("reference")
    assert "FilteredConv2dFunction" in type(node).__name__ and not small_maps.is_patch_major(pooled[0])
    node, pooled = _saved_pooled_and_node("small_maps")
    assert "FilteredConv2dFunction" in type(node).__name__ and small_maps.is_patch_major(pooled[0])
    assert get_backend() is None  # each block put the default order back


def test_set_backend_refuses_unknown_names_and_returns_the_previous_one():
    with pytest.raises(ValueError, match="backend must be one of cpu, triton, small_maps, reference"):
        set_backend("cuda")
    assert set_backend("reference") is None
    assert set_backend(None) == "reference"
    assert list(BACKENDS) == ["cpu", "triton", "small_maps", "reference"]


@pytest.mark.parametrize("value,ok", [("reference", True), ("bogus", False)])
def test_the_environment_variable_pins_a_backend(value, ok):
    code = "from lightning_gf.config import get_backend; print(get_backend())"
    env = {**os.environ, "LIGHTNING_GF_BACKEND": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert done.returncode == 0 and done.stdout.strip() == value
    else:
        assert done.returncode != 0 and "LIGHTNING_GF_BACKEND='bogus' names no backend" in done.stderr


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be an int >= 1"), (dict(r={}), "r mapping is empty"), (dict(r={"a": True}), r"r\['a'\]"),
    (dict(depth=1.5), "depth must be an int >= 1"), (dict(include="layer4.*"), "include must be a list"),
    (dict(filter_fn=3), "filter_fn must be callable"),
])
def test_config_checks_every_option_once(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientFilterConfig(**kwargs)


def test_config_is_frozen_and_its_options_round_trip():
    config = GradientFilterConfig(r={"block.*": 2, "*": 4}, depth=2, exclude=("se",))
    with pytest.raises(AttributeError):
        config.depth = 3  # type: ignore[misc]
    assert GradientFilterConfig(**config.options()) == config
    assert config.options()["exclude"] == ["se"]


def test_apply_takes_a_config_and_refuses_it_beside_other_options():
    model = TinyCNN()
    handle = apply_gradient_filter(model, GradientFilterConfig(r=2, depth=1), example_input=X)
    assert [layer.name for layer in handle.layers] == ["last.0"]
    handle.remove()
    with pytest.raises(TypeError, match=r"not both: \['depth'\]"):
        apply_gradient_filter(model, config=GradientFilterConfig(), depth=1, example_input=X)


def test_filter_fn_decides_which_convs_may_be_filtered():
    model = TinyCNN()
    seen = []

    def only_stride_one(name, conv):
        seen.append(name)
        return conv.stride == (1, 1)

    handle = apply_gradient_filter(model, r=2, depth=2, filter_fn=only_stride_one, example_input=X)
    assert [layer.name for layer in handle.layers] == ["stem.0", "last.0"]  # block.0 has stride 2
    assert "block.0" in seen
