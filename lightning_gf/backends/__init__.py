"""The kernels the ops run on: ``cpu`` (compiled C++, with its sources in ``cpu/csrc``),
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``small_maps`` (plain PyTorch,
for small maps). Imports nothing of ``lightning_gf`` but ``lightning_gf.config``."""
