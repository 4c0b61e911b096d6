"""What the per-conv plan cache of the compiled CPU node buys: calls with it against calls
that work the plan out again (the cache emptied before each), turn by turn in one process.

    python -m benchmarks.plan_cache [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_gf.ops import conv
from lightning_gf.ops.conv import filtered_conv2d

LAYERS = [("3x3 1x8x8x8", (1, 8, 8, 8), 8), ("3x3 8x64x14x14", (8, 64, 14, 14), 64),
          ("dw3x3 8x144x28x28", (8, 144, 28, 28), 1)]


def _call(x: torch.Tensor, w: torch.Tensor, groups: int) -> float:
    x._gf_pooled = None
    start = time.perf_counter()
    filtered_conv2d(x, w, padding=1, groups=groups, r=2).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("| layer | forward + backward, plan cached (us) | plan worked out each call (us) | ratio |")
    print("|---|---|---|---|")
    for name, shape, c_in_group in LAYERS:
        groups = shape[1] // c_in_group
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[1], c_in_group, 3, 3, requires_grad=True)
        cached, fresh = [], []
        for _ in range(args.repeats):
            cached.append(_call(x, w, groups))
            conv._NODE_PLANS.clear()
            fresh.append(_call(x, w, groups))
        a, b = statistics.median(cached[5:]) * 1e6, statistics.median(fresh[5:]) * 1e6
        print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
