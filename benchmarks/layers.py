"""Per-layer forward and backward time: filtered_conv2d vs PyTorch's own conv.

Run: ``.venv/bin/python -m benchmarks.layers [--quick] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks.timing import cuda_graph_ms, cuda_median_ms, geomean, median_ms
from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.ops.conv import filtered_conv2d


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str
    c_in: int
    c_out: int
    size: tuple[int, int]
    k: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1


# The paper's per-layer suite (3x3, stride 1, padding 1, Cin = Cout), then other kinds.
PAPER_SUITE = [LayerSpec(f"3x3 {c}x{h}x{w}", "paper", c, c, (h, w)) for c, h, w in [
    (128, 120, 160), (256, 60, 80), (512, 30, 40), (512, 14, 14), (256, 14, 14), (128, 28, 28), (64, 56, 56)]]
OTHER = [
    LayerSpec("dw3x3 144x56x56", "depthwise", 144, 144, (56, 56), groups=144),
    LayerSpec("dw3x3 960x7x7", "depthwise", 960, 960, (7, 7), groups=960),
    LayerSpec("1x1 64->256 56x56", "1x1", 64, 256, (56, 56), k=1, padding=0),
    LayerSpec("1x1 160->960 7x7", "1x1", 160, 960, (7, 7), k=1, padding=0),
    LayerSpec("3x3 s2 128->256 56x56", "strided", 128, 256, (56, 56), stride=2),
    LayerSpec("1x1 s2 256->512 14x14", "strided", 256, 512, (14, 14), k=1, stride=2, padding=0),
    LayerSpec("3x3 d12 512->256 64x64", "dilated", 512, 256, (64, 64), padding=12, dilation=12),
    LayerSpec("3x3 d4 512->512 32x32", "dilated", 512, 512, (32, 32), padding=4, dilation=4),
]


# Turns per layer (each contender once per turn; the median is taken), and how many times
# more on maps of fewer cells (cheap, and noisier: a hiccup of the machine weighs more).
REPEATS = 9
SMALL_MAP_CELLS = 3000
SMALL_MAP_FACTOR = 3


def bench_layer(spec: LayerSpec, r: int, batch: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    """Forward and backward times (ms) of one layer, vanilla and filtered in turn.

    On CUDA the times come from CUDA events (:func:`benchmarks.timing.cuda_median_ms`),
    elsewhere from the wall clock around each call.
    """
    g = torch.Generator(device=device).manual_seed(0)  # drawn where they are used: large maps are slow on a CPU
    x = torch.randn(batch, spec.c_in, *spec.size, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(spec.c_out, spec.c_in // spec.groups, spec.k, spec.k, generator=g, device=device) * 0.05).to(dtype)
    w.requires_grad_()
    b = torch.zeros(spec.c_out, device=device, dtype=dtype, requires_grad=True)
    conv = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups)
    on_cuda = torch.device(device).type == "cuda"
    timer = cuda_median_ms if on_cuda else median_ms

    def filtered_forward():
        # every training step brings a new input, so pool it every time: drop the pooled
        # copy that the filter caches on the input tensor for parallel branches
        x._gf_pooled = None
        return filtered_conv2d(x, w, b, **conv, r=r)

    forward = timer(
        {
            "vanilla": lambda: F.conv2d(x, w, b, **conv),
            "filtered": filtered_forward,
        },
        repeats,
    )
    y_v = F.conv2d(x, w, b, **conv)
    y_f = filtered_conv2d(x, w, b, **conv, r=r)
    gy = torch.randn(y_v.shape, generator=g, device=device).to(dtype)
    backward = timer(
        {
            "vanilla": lambda: torch.autograd.grad(y_v, (x, w, b), gy, retain_graph=True),
            "filtered": lambda: torch.autograd.grad(y_f, (x, w, b), gy, retain_graph=True),
        },
        repeats,
    )
    return {
        **asdict(spec), "r": r, "batch": batch, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "fwd_vanilla_ms": forward["vanilla"], "fwd_filtered_ms": forward["filtered"],
        "bwd_vanilla_ms": backward["vanilla"], "bwd_filtered_ms": backward["filtered"],
        "bwd_speedup": backward["vanilla"] / backward["filtered"],
        "fwd_overhead": forward["filtered"] / forward["vanilla"],
    }


def bench_layer_graphed(spec: LayerSpec, r: int, batch: int, repeats: int, dtype: torch.dtype) -> dict:
    """GPU time alone (CUDA graphs, see ``timing.cuda_graph_ms``) of the forward and of forward
    plus backward, vanilla and filtered; backward = their difference. Same row keys as
    :func:`bench_layer`, with ``graphed: True``."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, spec.c_in, *spec.size, generator=g, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(spec.c_out, spec.c_in // spec.groups, spec.k, spec.k, generator=g, device="cuda") * 0.05).to(dtype)
    w.requires_grad_()
    b = torch.zeros(spec.c_out, device="cuda", dtype=dtype, requires_grad=True)
    conv = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups)
    gy = torch.randn(F.conv2d(x, w, b, **conv).shape, generator=g, device="cuda").to(dtype)

    def vanilla():
        return F.conv2d(x, w, b, **conv)

    def filtered():
        x._gf_pooled = None  # a new input every step: pool it every time
        return filtered_conv2d(x, w, b, **conv, r=r)

    t = cuda_graph_ms({
        "fwd_v": vanilla, "fwd_f": filtered,
        "both_v": lambda: torch.autograd.grad(vanilla(), (x, w, b), gy),
        "both_f": lambda: torch.autograd.grad(filtered(), (x, w, b), gy),
    }, repeats)
    bwd_v, bwd_f = t["both_v"] - t["fwd_v"], t["both_f"] - t["fwd_f"]
    return {
        **asdict(spec), "r": r, "batch": batch, "device": "cuda", "dtype": str(dtype).replace("torch.", ""),
        "graphed": True, "fwd_vanilla_ms": t["fwd_v"], "fwd_filtered_ms": t["fwd_f"],
        "bwd_vanilla_ms": bwd_v, "bwd_filtered_ms": bwd_f, "bwd_speedup": bwd_v / max(bwd_f, 1e-6),
        "fwd_overhead": t["fwd_f"] / t["fwd_v"],
    }


def run(rs=(2, 4), batch: int = 8, repeats: int = REPEATS, device: str = "cpu", dtype=torch.float32,
        quick=False) -> list[dict]:
    specs = PAPER_SUITE + OTHER
    if quick:
        specs = specs[3:5] + OTHER[:1]
        repeats = 2
    rows = []
    for r in rs:
        for spec in specs:
            small = spec.size[0] * spec.size[1] < SMALL_MAP_CELLS  # cheap and noisy: more repeats
            row = bench_layer(spec, r, batch, repeats * SMALL_MAP_FACTOR if small else repeats, device, dtype)
            rows.append(row)
            print(f"r={r} {spec.name:28s} bwd {row['bwd_vanilla_ms']:8.2f} -> {row['bwd_filtered_ms']:7.2f} ms "
                  f"({row['bwd_speedup']:5.1f}x)  fwd x{row['fwd_overhead']:.2f}", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for r in sorted({row["r"] for row in rows}):
        at_r = [row for row in rows if row["r"] == r]
        paper = [row["bwd_speedup"] for row in at_r if row["kind"] == "paper"]
        out[r] = {
            "paper_bwd_geomean": geomean(paper),
            "slowest_bwd": min(row["bwd_speedup"] for row in at_r),
            "slowest_layer": min(at_r, key=lambda row: row["bwd_speedup"])["name"],
            "fwd_overhead_geomean": geomean([row["fwd_overhead"] for row in at_r]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write rows as JSON here")
    parser.add_argument("--plain", action="store_true", help="without the compiled CPU kernels (plain PyTorch path)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.plain:
        cpu_kernels.set_enabled(False)
    rows = run(batch=args.batch, device=args.device, quick=args.quick)
    print(json.dumps(summary(rows), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
