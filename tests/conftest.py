"""Test-session settings.

One intra-op thread: the models in the tests are tiny, and on a busy 2-core machine
OpenMP threads waiting for each other made a tiny training step 10x slower
(35 ms with 2 threads against 3.3 ms with 1, TinyCNN forward+backward, batch 4).
"""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402

from lightning_gf import cpu_kernels, functional  # noqa: E402


@pytest.fixture(params=["compiled", "plain"])
def cpu_path(request):
    """Run a test with the compiled CPU kernels, then with the plain PyTorch path."""
    if request.param == "compiled" and not cpu_kernels.available():
        pytest.skip("compiled CPU kernels unavailable (tests/test_cpu_kernels.py says why)")
    previous = cpu_kernels.set_enabled(request.param == "compiled")
    min_cells, functional.KERNEL_MIN_CELLS = functional.KERNEL_MIN_CELLS, 0  # tiny test maps take them too
    yield request.param
    cpu_kernels.set_enabled(previous)
    functional.KERNEL_MIN_CELLS = min_cells
