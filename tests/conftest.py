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
from lightning_gf.config import BACKENDS, force_backend  # noqa: E402


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
