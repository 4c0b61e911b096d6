"""Test-session settings.

One intra-op thread: the models in the tests are tiny, and on a busy 2-core machine
OpenMP threads waiting for each other made a tiny training step 10x slower
(35 ms with 2 threads against 3.3 ms with 1, TinyCNN forward+backward, batch 4).
"""

import os

import torch

torch.set_num_threads(1)

# Without a GPU the Triton kernels run under Triton's interpreter, on CPU tensors (read
# when the kernels are first imported, so before any test runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import contextlib  # noqa: E402

import pytest  # noqa: E402

from lightning_gf.backends import cpu as cpu_kernels  # noqa: E402
from lightning_gf.backends import triton as triton_kernels

# How the filter pools and spreads maps: the compiled kernels, PyTorch's ops, the 0/1
# matrix product it uses on small maps (each forced on every map size), or the Triton
# kernels it uses on CUDA (here under Triton's interpreter).
CPU_PATHS = {
    "compiled": dict(kernels=True, small_map=0, few_patches=0, triton=False),
    "plain": dict(kernels=False, small_map=0, few_patches=0, triton=False),
    "small_maps": dict(kernels=False, small_map=10**9, few_patches=10**9, triton=False),
    "triton": dict(kernels=False, small_map=0, few_patches=0, triton=True),
}


@contextlib.contextmanager
def cpu_path_forced(name):
    """Force one of ``CPU_PATHS`` for the duration of the block."""
    from lightning_gf.backends import small_maps

    path = CPU_PATHS[name]
    saved = (small_maps.SMALL_MAP, small_maps.FEW_PATCHES)
    previous = cpu_kernels.set_enabled(path["kernels"])
    small_maps.SMALL_MAP, small_maps.FEW_PATCHES = path["small_map"], path["few_patches"]
    if path["triton"]:
        triton_kernels.enable_on("cpu")
    try:
        yield
    finally:
        cpu_kernels.set_enabled(previous)
        small_maps.SMALL_MAP, small_maps.FEW_PATCHES = saved
        triton_kernels.disable_on("cpu")


@pytest.fixture(params=list(CPU_PATHS))
def cpu_path(request):
    """Run a test once per way of pooling and spreading maps (see ``CPU_PATHS``)."""
    if request.param == "compiled" and not cpu_kernels.available():
        pytest.skip("compiled CPU kernels unavailable (tests/test_cpu_kernels.py says why)")
    if request.param == "triton" and not triton_kernels.available():
        pytest.skip("Triton is not installed")
    if request.param == "triton" and torch.cuda.is_available():
        pytest.skip("with a GPU the Triton kernels are tested on it (tests/test_triton_kernels.py)")
    with cpu_path_forced(request.param):
        yield request.param
