"""Compiled CPU kernels for the filter's memory-bound steps, built once on first use.

Pooling a map over the patch grid and spreading patch values back over a map are one
pass each in C++ (``csrc/patch_kernels.cpp``) instead of several PyTorch calls, and
so are the two per-kernel steps on weights (summing the taps, broadcasting one value
over them); ``csrc/filtered_conv.cpp`` makes the whole filtered conv one C++ autograd
node where that backward covers it. The first filtered conv on CPU compiles them with
the system's C++ compiler and ``ninja`` (about 30 s, once; cached under
``$LIGHTNING_GF_CACHE``, default ``~/.cache/lightning_gf``, per source files, torch,
Python and CPU). Without a compiler, or with ``LIGHTNING_GF_CPU_KERNELS=0``, the filter
runs the same math in plain PyTorch (slower, same results; the tests check both).

Example:
    >>> import lightning_gf.backends.cpu as cpu_kernels
    >>> isinstance(cpu_kernels.available(), bool)
    True
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_gf import config
from lightning_gf.backends import small_maps

ENV_SWITCH = "LIGHTNING_GF_CPU_KERNELS"
ENV_CACHE = "LIGHTNING_GF_CACHE"
_NAME = "lightning_gf_cpu"
_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
_HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
# OpenMP as torch's own parallel backend: without it ``at::parallel_for`` in the kernels
# runs on one thread
_OPENMP = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform == "linux" else []
_FLAGS = ["-O3", "-march=native", *_OPENMP]

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
_enabled = True


def _machine_key() -> str:
    """What a built library depends on: the sources, torch, Python and this CPU's features."""
    cpu_flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu_flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        cpu_flags = platform.processor()
    parts = [*(path.read_bytes() for path in _SOURCES + _HEADERS), torch.__version__.encode(), sys.version.encode(),
             platform.machine().encode(), cpu_flags.encode(), " ".join(_FLAGS).encode()]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def build_directory() -> Path:
    """Where the kernels for this source, torch, Python and CPU are built and cached.

    Example:
        >>> build_directory().name.startswith("cpu_kernels_")
        True
    """
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lightning_gf")
    return base / f"cpu_kernels_{_machine_key()}"


def _build_and_load() -> None:
    directory = build_directory()
    library = directory / f"{_NAME}.so"
    done = directory / "built"
    if library.exists() and done.exists():
        torch.ops.load_library(str(library))
        return
    directory.mkdir(parents=True, exist_ok=True)
    print(f"lightning_gf: compiling the CPU kernels (once, about 30 s) into {directory}", file=sys.stderr, flush=True)
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No CUDA runtime is found" (logged on import): these kernels need none
    path = os.environ.get("PATH", "")
    # the `ninja` of this environment (a dependency), also when it is not activated
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=_NAME, sources=[str(path) for path in _SOURCES], extra_cflags=_FLAGS,
                           extra_ldflags=_OPENMP, build_directory=str(directory),
                           is_python_module=False, verbose=False)
    finally:
        quiet.setLevel(level)
        os.environ["PATH"] = path
    done.touch()


def available() -> bool:
    """Whether the compiled kernels are in use (builds or loads them on the first call).

    False when ``LIGHTNING_GF_CPU_KERNELS=0``, when :func:`set_enabled` turned them off,
    or when they could not be built (a warning says why, once).
    """
    global _loaded
    forced = config._FORCED
    if not _enabled or (forced is not None and forced != "cpu"):
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                    _loaded = False
                else:
                    try:
                        _build_and_load()
                        _loaded = True
                    except Exception as error:  # no compiler, no headers, read-only cache, ...
                        warnings.warn(
                            f"lightning_gf: could not build the CPU kernels ({type(error).__name__}: {error}); "
                            f"the filter uses its plain PyTorch path (same results, slower on CPU). "
                            f"Set {ENV_SWITCH}=0 to skip trying.",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        _loaded = False
    if not _loaded and forced == "cpu":
        raise RuntimeError(
            f"force_backend('cpu') (or {config.ENV_BACKEND}=cpu) but the compiled CPU kernels are off or could not "
            f"be built ({ENV_SWITCH}, set_enabled, or the warning above says why): pin another backend"
        )
    return _loaded


def set_enabled(enabled: bool) -> bool:
    """Turn the compiled kernels on or off for this process; returns the previous setting.

    Example:
        >>> previous = set_enabled(False)
        >>> available()
        False
        >>> _ = set_enabled(previous)
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


# --- the steps of the filtered conv on these kernels (see docs/architecture.md) ----------

NAME = "cpu"
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def channel_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (N, C, h, w) is stored as (C, N, h, w): read as a (C, N*h*w) matrix for free."""
    return t.transpose(0, 1).is_contiguous()


def declines(t: torch.Tensor, *_: object) -> Optional[str]:
    """Why the kernels do not take ``t`` (None: they do): a plain CPU tensor of their dtypes,
    outside tracing, stored contiguous, channel-major (what they make) or patch-major (what
    small maps make). The cheapest checks first: this runs several times per call."""
    if type(t) is not torch.Tensor or not t.is_cpu:
        return "not a plain CPU tensor"
    if t.dtype not in DTYPES:
        return "a dtype the kernels do not take"
    if torch.compiler.is_compiling():  # before available(): its lock breaks a torch.compile graph
        return "torch.compile is tracing (the kernels have no fake kernels yet)"
    if not available():
        return "off (LIGHTNING_GF_CPU_KERNELS=0, set_enabled(False) or another backend pinned) or not built"
    if not (t.is_contiguous() or channel_major(t) or small_maps.is_patch_major(t)):
        return "a layout the kernels do not read (channels_last)"
    return None


def declines_spread(low: torch.Tensor, height: int, width: int, grid_h: Any, grid_w: Any,
                    channels_last: bool) -> Optional[str]:
    """:func:`declines`, and a channels_last ``g_x`` (the kernel writes NCHW)."""
    return "a channels_last g_x (the kernel writes NCHW)" if channels_last else declines(low)


def _patch_pool(t: torch.Tensor, grid_h: Any, grid_w: Any, on_input: bool, mean: bool,
                total: bool) -> tuple[torch.Tensor, torch.Tensor]:
    kh, before_h, _ = grid_h.cells(on_input)
    kw, before_w, _ = grid_w.cells(on_input)
    return torch.ops.lightning_gf_cpu.patch_pool(t, kh, kw, before_h, before_w, grid_h.patches, grid_w.patches, mean,
                                                 total)


def pool(t: torch.Tensor, grid_h: Any, grid_w: Any, on_input: bool) -> torch.Tensor:
    """Patch sums of ``t`` in one call, any map size (small maps in registers), channel-major."""
    return _patch_pool(t, grid_h, grid_w, on_input, False, False)[0]


def means_and_total(grad_out: torch.Tensor, grid_h: Any, grid_w: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch means of ``grad_out`` and its per-channel total, in one pass."""
    return _patch_pool(grad_out, grid_h, grid_w, False, True, True)


def spread(low: torch.Tensor, height: int, width: int, grid_h: Any, grid_w: Any, scale: float, dtype: torch.dtype,
           channels_last: bool) -> torch.Tensor:
    """``g_x`` written once, NCHW."""
    return torch.ops.lightning_gf_cpu.patch_spread(low, height, width, grid_h.in_patch, grid_w.in_patch,
                                                   grid_h.in_before, grid_w.in_before, scale, dtype)


def tap_sums(w: torch.Tensor) -> torch.Tensor:
    """The sum of each kernel's taps, ``(C_out, C_in/groups)``."""
    return torch.ops.lightning_gf_cpu.tap_sums(w)


def broadcast(per_pair: torch.Tensor, weight_shape: torch.Size, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``g_w``: each pair's value times ``scale`` over every tap, in one pass."""
    return torch.ops.lightning_gf_cpu.tap_broadcast(per_pair, weight_shape[2], weight_shape[3], scale, dtype)
