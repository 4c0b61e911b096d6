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


import pytest  # noqa: E402

from lightning_gf.backends import cpu as cpu_kernels  # noqa: E402
from lightning_gf.backends import triton as triton_kernels  # noqa: E402
from lightning_gf.config import BACKENDS, force_backend, get_backend, set_backend  # noqa: E402


def available_backends() -> list[str]:
    """The backends that run on CPU tensors here (the Triton kernels under Triton's interpreter)."""
    names = [name for name in BACKENDS if name in ("reference", "small_maps")]
    if cpu_kernels.available():
        names.insert(0, "cpu")
    if triton_kernels.available() and not torch.cuda.is_available():  # with a GPU: tested on it
        names.append("triton")
    return names


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    """Run a test once per backend, pinned with ``force_backend`` (see ``lightning_gf.config``)."""
    if request.param not in available_backends():
        pytest.skip(f"backend {request.param!r} does not run on CPU tensors here")
    with force_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _backend_switches_kept():
    """Whatever a test does to the backend switches (the GPU benchmark turns the compiled CPU
    kernels off for its process) does not reach the tests after it."""
    enabled = cpu_kernels.set_enabled(True)
    cpu_kernels.set_enabled(enabled)
    forced = get_backend()
    yield
    cpu_kernels.set_enabled(enabled)
    set_backend(forced)


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run with ``GF_SLOW_TESTS=1``; ``gpu`` tests where CUDA is."""
    run_slow = os.environ.get("GF_SLOW_TESTS") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set GF_SLOW_TESTS=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
