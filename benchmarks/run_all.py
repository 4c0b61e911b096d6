"""``make bench``: every benchmark side by side, written to docs/benchmarks.md with plots.

Run: ``.venv/bin/python -m benchmarks.run_all [--quick]`` (about 15 minutes on 2 cores;
``--quick`` is a smoke run of a few seconds that writes nothing under docs/).

The GPU measurements come from ``benchmarks/gpu.py`` (run on the device); when
``docs/gpu-results.json`` is present this also rewrites ``docs/benchmarks-gpu.md`` from it
and links it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from benchmarks import gpu_docs, layers, models

DOCS = Path(__file__).resolve().parent.parent / "docs"
BUDGET_MIB = 1024


def _env() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


def _layer_table(rows: list[dict]) -> str:
    out = ["| layer | kind | r | fwd vanilla ms | fwd filtered ms | fwd ratio | bwd vanilla ms | bwd filtered ms | bwd speed-up |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        out.append(f"| {row['name']} | {row['kind']} | {row['r']} | {row['fwd_vanilla_ms']:.2f} | {row['fwd_filtered_ms']:.2f} "
                   f"| {row['fwd_overhead']:.2f}x | {row['bwd_vanilla_ms']:.2f} | {row['bwd_filtered_ms']:.2f} "
                   f"| **{row['bwd_speedup']:.1f}x** |")
    return "\n".join(out)


def _model_table(rows: list[dict]) -> str:
    out = ["| model | depth | input | batch | kept vanilla MiB | kept filter MiB | kept lean MiB | lean vs vanilla "
           "| step ms (v / f / lean) | backward ms (v / f / lean) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        out.append(
            f"| {row['model']} | {row['depth']} | {row['size']} | {row['batch']} | {row['kept_mib_vanilla']:.1f} "
            f"| {row['kept_mib_filter']:.1f} ({row['kept_change_filter']:+.0%}) | {row['kept_mib_lean']:.1f} "
            f"| **{row['kept_change_lean']:+.0%}** | {row['step_ms_vanilla']:.0f} / {row['step_ms_filter']:.0f} / "
            f"{row['step_ms_lean']:.0f} | {row['backward_ms_vanilla']:.0f} / {row['backward_ms_filter']:.0f} / "
            f"{row['backward_ms_lean']:.0f} |")
    return "\n".join(out)


def _budget_table(rows: list[dict]) -> str:
    out = [f"| model | largest batch in {BUDGET_MIB} MiB of kept activations: vanilla | filter | lean |", "|---|---|---|---|"]
    for row in rows:
        b = models.max_batch_in_budget(row, BUDGET_MIB)
        out.append(f"| {row['model']} | {b['vanilla']} | {b['filter']} | {b['lean']} |")
    return "\n".join(out)


def _plots(layer_rows: list[dict], model_rows: list[dict], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    names = []
    fig, ax = plt.subplots(figsize=(10, 5))
    specs = [row["name"] for row in layer_rows if row["r"] == 2]
    for i, r in enumerate(sorted({row["r"] for row in layer_rows})):
        values = [row["bwd_speedup"] for row in layer_rows if row["r"] == r]
        ax.bar([j + 0.4 * i for j in range(len(values))], values, width=0.4, label=f"r={r}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.2 for j in range(len(specs))], specs, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("backward speed-up vs PyTorch conv (x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "layer_speedup.png", dpi=110)
    names.append("img/layer_speedup.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [row["model"] for row in model_rows]
    for i, v in enumerate(("vanilla", "filter", "lean")):
        ax.bar([j + 0.27 * i for j in range(len(labels))], [row[f"kept_mib_{v}"] for row in model_rows], width=0.27, label=v)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.27 for j in range(len(labels))], labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("kept by the autograd graph (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(img / "model_memory.png", dpi=110)
    names.append("img/model_memory.png")
    plt.close(fig)
    return names


def _kernels_line() -> str:
    from lightning_gf.backends import cpu as cpu_kernels

    return "in use in this run" if cpu_kernels.available() else "NOT available in this run: plain PyTorch path"


def _gpu_line(docs: Path) -> str:
    return gpu_docs.LINK_LINE if (docs / "gpu-results.json").exists() else gpu_docs.NO_RESULTS_LINE


def write_docs(layer_rows: list[dict], model_rows: list[dict], docs: Path) -> None:
    summary = layers.summary(layer_rows)
    plots = _plots(layer_rows, model_rows, docs / "img")
    paper = "\n".join(
        f"- r={r}: paper suite backward **{s['paper_bwd_geomean']:.1f}x** faster (geometric mean); slowest layer of any "
        f"kind {s['slowest_bwd']:.2f}x ({s['slowest_layer']}); forward cost {s['fwd_overhead_geomean']:.3f}x (geometric "
        f"mean over all layers)" for r, s in summary.items())
    text = f"""# Benchmarks

Measured by `make bench` (`.venv/bin/python -m benchmarks.run_all`) on {_env()}.
Every ratio compares two contenders timed in turn in the same run: per layer, the median of
{layers.REPEATS} turns ({layers.REPEATS * layers.SMALL_MAP_FACTOR} on maps under {layers.SMALL_MAP_CELLS:,} cells).
Raw rows: [bench-results.json](bench-results.json). Earlier attempts and what limits the
speed: [benchmarks-history.md](benchmarks-history.md).

{_gpu_line(docs)}

## Per layer: filtered_conv2d vs PyTorch's conv (CPU, float32, batch 8)

Backward = `torch.autograd.grad` of the layer's output with respect to input, weight
and bias (everything the filtered op does is included: pooling, the two small
products, upsampling, the weight-gradient broadcast). Forward of the filtered op
includes pooling the input on every call (the pooled copy the filter caches on an input
tensor for parallel branches is dropped before each call, as each training step brings
a new input). Filtered runs use the compiled CPU kernels
({_kernels_line()}; see [usage.md](usage.md#compiled-cpu-kernels-lightning_gfcpu_kernels)).
With them the depthwise layers' filtered forward runs lightning_gf's own depthwise conv,
fused with the pooling, whose output is PyTorch's bit for bit; the vanilla column is
PyTorch's conv.

{paper}

{_layer_table(layer_rows)}

![speed-up per layer]({plots[0]})

## End to end: what the autograd graph keeps, step and backward time

The same frozen part, the same trainable set, BatchNorm in eval mode; r = 2. "Kept" is
the sum of the distinct storages autograd saves during the model's forward (parameters
and buffers excluded): what the graph keeps when forward ends. `filter` is the filtered
convs alone (`lean=False`), `lean` the default (see [memory.md](memory.md)). Step =
forward + backward of a mean-square loss; backward = `torch.autograd.grad` over the
trainable parameters.

{_model_table(model_rows)}

![kept memory]({plots[1]})

### Largest batch in a budget (estimated)

No GPU was available, so this is estimated from the measured per-sample kept memory:
`floor(budget / kept_per_sample)`. It counts only what the graph keeps, not the frozen
part's transient forward memory, weights or optimizer state (see "Honest memory" in
the method notes: on GPU the *peak* of shallow fine-tuning is set by the frozen
forward).

{_budget_table(model_rows)}
"""
    (docs / "benchmarks.md").write_text(text)
    (docs / "bench-results.json").write_text(json.dumps({"layers": layer_rows, "models": model_rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run; writes nothing under docs/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", default=str(DOCS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("per-layer benchmark", flush=True)
    layer_rows = layers.run(quick=args.quick)
    print("model benchmark", flush=True)
    model_rows = models.run(quick=args.quick)
    if args.quick:
        print(json.dumps(layers.summary(layer_rows), indent=1))
        return
    write_docs(layer_rows, model_rows, Path(args.docs))
    print(f"wrote {args.docs}/benchmarks.md")
    gpu_results = Path(args.docs) / "gpu-results.json"
    if gpu_results.exists():
        print(f"wrote {gpu_docs.write_from_json(gpu_results, Path(args.docs))}")


if __name__ == "__main__":
    main()
