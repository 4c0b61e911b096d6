"""Side-by-side timing helpers: alternate the contenders so that both see the same load."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time in ms of each function, calling them in turn ``repeats`` times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                   min_ms: float = 1.0, max_calls: int = 50) -> dict[str, float]:
    """Median GPU time in ms per call of each function, timed with CUDA events.

    Each timed repeat is a loop of calls (as many as make it last about ``min_ms``,
    at most ``max_calls``), without synchronizing inside it, so that small kernels
    are timed back to back as in training; the contenders take turns.

    Example (on a CUDA machine):
        >>> x = torch.randn(1024, 1024, device="cuda")  # doctest: +SKIP
        >>> cuda_median_ms({"mm": lambda: x @ x}, repeats=5)  # doctest: +SKIP
        {'mm': 0.05...}
    """
    import torch

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    calls = {}
    for name, fn in fns.items():  # calibrate: how many calls make one timed repeat
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        calls[name] = max(1, min(max_calls, math.ceil(min_ms / one)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls[name]):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


def cuda_graph_ms(fns: dict[str, Callable[[], object]], repeats: int, calls: int = 20) -> dict[str, float]:
    """Median GPU time in ms per call of each function, each captured once as a CUDA graph
    and replayed ``calls`` times per timed repeat: the GPU's time alone, without the
    Python and launch costs that eager mode adds on the CPU (what a graphed or compiled
    training step pays). The contenders take turns.

    Example (on a CUDA machine):
        >>> x = torch.randn(1024, 1024, device="cuda")  # doctest: +SKIP
        >>> cuda_graph_ms({"mm": lambda: x @ x}, repeats=5)  # doctest: +SKIP
        {'mm': 0.04...}
    """
    import torch

    graphs = {}
    for name, fn in fns.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs[name] = graph
    for graph in graphs.values():
        graph.replay()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(repeats):
        for name, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                graph.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def geomean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")
