"""Does a specialised route earn its place? Each backend pinned in turn on the same layers.

    python -m benchmarks.routes [--repeats 9] [--threads 2]

Times the filtered forward and backward of small-map layers (where ``small_maps`` takes
them in the default order) with ``force_backend`` set to each CPU backend, turn by turn in
one process, and prints the median times and each backend's ratio to ``reference``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_gf.config import force_backend
from lightning_gf.ops.conv import filtered_conv2d

LAYERS = [  # (name, c_in, c_out, size, groups)
    ("3x3 512x7x7", 512, 512, 7, 1),
    ("3x3 256x14x14", 256, 256, 14, 1),
    ("dw3x3 960x7x7", 960, 960, 7, 960),
    ("3x3 128x28x28", 128, 128, 28, 1),
]
BACKENDS = ("cpu", "small_maps", "reference")


def _step(x, w, r):
    x._gf_pooled = None  # a new input every step: pool it again
    y = filtered_conv2d(x, w, padding=1, groups=w.shape[0] if w.shape[1] == 1 else 1, r=r)
    start = time.perf_counter()
    y.backward(torch.ones_like(y))
    return start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"| layer | r | {' | '.join(f'{b} fwd / bwd (ms)' for b in BACKENDS)} | small_maps / reference fwd, bwd |")
    print("|---|---|" + "---|" * (len(BACKENDS) + 1))
    for name, c_in, c_out, size, groups in LAYERS:
        for r in (2, 4):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, c_in, size, size, generator=g, requires_grad=True)
            w = (torch.randn(c_out, c_in // groups, 3, 3, generator=g) * 0.05).requires_grad_()
            times = {b: ([], []) for b in BACKENDS}
            for _ in range(args.repeats + 1):  # the first turn warms up
                for backend in BACKENDS:
                    with force_backend(backend):
                        t0 = time.perf_counter()
                        t1 = _step(x, w, r)
                        t2 = time.perf_counter()
                    times[backend][0].append(t1 - t0)
                    times[backend][1].append(t2 - t1)
            med = {b: (statistics.median(f[1:]) * 1e3, statistics.median(bw[1:]) * 1e3) for b, (f, bw) in times.items()}
            cells = " | ".join(f"{med[b][0]:.3f} / {med[b][1]:.3f}" for b in BACKENDS)
            ratio = (med["small_maps"][0] / med["reference"][0], med["small_maps"][1] / med["reference"][1])
            print(f"| {name} | {r} | {cells} | {ratio[0]:.2f}, {ratio[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
