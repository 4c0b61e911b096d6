"""Side-by-side timing helpers: alternate the contenders so that both see the same load."""

from __future__ import annotations

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


def geomean(values: list[float]) -> float:
    return statistics.geometric_mean(values) if values else float("nan")
