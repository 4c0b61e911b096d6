"""The one dispatcher: which backend runs each step, pinned or not, and why the others declined."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.backends import dispatch
from lightning_gf.backends import triton as triton_kernels
from lightning_gf.config import BACKENDS, force_backend
from lightning_gf.ops.patch_grid import AxisGrid

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="compiled CPU kernels unavailable")


def _grids(size, r):
    g = AxisGrid.build(in_size=size, out_size=size, r=r, stride=1)
    return g, g


def test_every_step_asks_its_backends_in_the_order_of_the_config():
    for step, table in dispatch._STEPS.items():
        names = [name for name, _, _ in table]
        assert names == [b for b in BACKENDS if b in names] and names[-1] == "reference", step


@needs_kernels
def test_default_order_takes_the_first_backend_that_takes_the_input():
    big, small = torch.randn(2, 3, 40, 40), torch.randn(2, 3, 7, 7)
    assert dispatch.backend_of("pool", big, *_grids(40, 2)) == "cpu"
    channels_last = big.contiguous(memory_format=torch.channels_last)
    assert dispatch.backend_of("pool", channels_last, *_grids(40, 2)) == "reference"  # cpu and small_maps decline
    previous = cpu_kernels.set_enabled(False)
    try:
        assert dispatch.backend_of("pool", small, *_grids(7, 2)) == "small_maps"  # 16 patches of 49 cells
        assert dispatch.backend_of("pool", big, *_grids(40, 2)) == "reference"  # 400 patches
        assert dispatch.backend_of("taps", torch.randn(4, 3, 3, 3)) == "reference"
    finally:
        cpu_kernels.set_enabled(previous)
    low = torch.randn(2, 3, 20, 20)
    assert dispatch.backend_of("spread", low, 40, 40, *_grids(40, 2), False) == "cpu"
    assert dispatch.backend_of("spread", low, 40, 40, *_grids(40, 2), True) == "reference"  # NCHW-only kernel


@pytest.mark.parametrize("pinned", BACKENDS)
def test_a_pinned_backend_runs_alone_and_the_reference_what_it_declines(pinned):
    if pinned == "cpu" and not cpu_kernels.available():
        pytest.skip("compiled CPU kernels unavailable")
    if pinned == "triton" and (not triton_kernels.available() or torch.cuda.is_available()):
        pytest.skip("Triton on CPU tensors runs under its interpreter only")
    x = torch.randn(2, 3, 40, 40)
    with force_backend(pinned):
        assert dispatch.backend_of("pool", x, *_grids(40, 2)) == pinned  # every backend pools a CPU NCHW map
        taps = dispatch.backend_of("taps", torch.randn(4, 3, 3, 3))
        assert taps == (pinned if pinned in ("cpu", "reference") else "reference")  # no taps step there


@needs_kernels
def test_the_dispatcher_says_once_which_backend_runs_and_why_the_others_declined(caplog):
    x = torch.randn(2, 3, 30, 30).contiguous(memory_format=torch.channels_last)
    with caplog.at_level(logging.DEBUG, logger="lightning_gf.backends.dispatch"):
        for _ in range(3):
            dispatch.pool(x, *_grids(30, 2), True)
    said = [r.getMessage() for r in caplog.records if r.name == "lightning_gf.backends.dispatch"]
    assert len(said) == 1
    assert "pool of a (2, 3, 30, 30) float32 channels_last map on cpu (default order) runs on reference" in said[0]
    assert "cpu: a layout the kernels do not read (channels_last)" in said[0]
    assert "small_maps: more than 1024 cells or 16 patches" in said[0]
