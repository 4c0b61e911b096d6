"""Keep freed memory in the process, as a long training loop's allocator settles to.

By default glibc gives buffers above a moving threshold back to the OS when they are
freed, and takes fresh pages for the next one: each page costs a fault the first time it
is written. On this 2-core VM PyTorch's depthwise conv on 8x144x56x56 took 10,552 faults
and 23 ms a call one run, 4 ms without faults the next, depending on what the process had
allocated before; the ratios of small layers swung with it. The benchmarks fix glibc's
thresholds (the same for both contenders) so that freed buffers are reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit); larger buffers are still mapped per call
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's ``mallopt`` thresholds so that freed buffers up to 32 MiB are reused and
    the heap is not trimmed. Returns whether glibc took both (False off Linux/glibc).

    Example:
        >>> keep_freed_memory() in (True, False)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
