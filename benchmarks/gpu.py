"""The device benchmark: correctness on the device first, then timings and memory.

Run from the repository root (the project need not be installed):

    PYTHONPATH=. python3 -m benchmarks.gpu --out DIR             # on a CUDA machine, a few minutes
    PYTHONPATH=. python3 -m benchmarks.gpu --out DIR --smoke --device cpu   # tiny sizes, any machine
    PYTHONPATH=. python3 -m benchmarks.gpu --docs-only [--json docs/gpu-results.json]

Sections, cheapest and most important first (``--sections`` picks some):

1. ``correctness``: ``filtered_conv2d``'s gradients on the device against float64 results
   (``benchmarks/gpu_correctness.py``), its forward against ``F.conv2d``;
2. ``layers``: per-layer forward/backward times at batch 32 (``benchmarks/layers.py``),
   float32 and bfloat16, r = 2 then r = 4;
3. ``models``: timm mobilenetv2_100, resnet18, efficientnet_b0 (depth 4, batch 64, 224 px, r = 2):
   step time, memory kept when forward ends, the step's peak (``benchmarks/gpu_models.py``);
4. ``segmentation``: smp UPerNet and DeepLabV3 with a resnet18 encoder (depth 10, batch 8,
   512 px), skipped with the reason if segmentation_models_pytorch does not import;
5. ``budget``: the largest batch whose training step fits 8 GiB, vanilla and lean;
6. ``graphs``: the timm models' step under CUDA graphs, vanilla and lean (last: a failed
   capture may leave the device unusable).

``DIR/gpu-results.json`` is rewritten after every section (a run cut short keeps what it
did). No new measurement starts after ``--deadline-s`` (260 s; the per-layer section has
its own ``--layers-budget-s``): what is left is listed as skipped. A device left unusable
by a kernel fault (a sticky CUDA error) stops the run after the section, saying so. The
exit status is 1 if any correctness check failed or anything crashed; a failed check does
not stop the timings. ``--docs-only`` writes ``docs/benchmarks-gpu.md`` from a results file
(``benchmarks/gpu_docs.py``) and runs nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import gpu_correctness, gpu_docs, gpu_models, layers
from lightning_gf.backends import cpu as cpu_kernels

SECTIONS = ("correctness", "layers", "layers_graphed", "models", "segmentation", "budget", "graphs")
TIMM = ("timm mobilenetv2_100", "timm resnet18", "timm efficientnet_b0")
SMP = ("smp UPerNet-resnet18", "smp DeepLabV3-resnet18")
BUDGET_MIB = 8192

SMOKE_LAYERS = [
    layers.LayerSpec("3x3 16x20x20", "paper", 16, 16, (20, 20)),
    layers.LayerSpec("dw3x3 16x20x20", "depthwise", 16, 16, (20, 20), groups=16),
    layers.LayerSpec("3x3 s2 8->16 20x20", "strided", 8, 16, (20, 20), stride=2),
]


def log(message: str) -> None:
    print(message, flush=True)


def _cudnn_version() -> int | None:
    try:
        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # no usable cuDNN: recorded as None
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions and the device, as recorded in the results."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": _cudnn_version(),
        "device": device,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    for name in ("triton", "timm", "segmentation_models_pytorch", "lightning", "pytorch_lightning"):
        try:
            env[name] = __import__(name).__version__
        except Exception as error:  # not installed: say so in the results
            env[name] = f"not available ({type(error).__name__})"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_mib=props.total_memory / 2**20,
                   capability=f"{props.major}.{props.minor}")
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                       cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None  # no git, or not a checkout (a copied tree)
    return env


class Results:
    """The results file, rewritten whole after each section."""

    def __init__(self, out_dir: Path, data: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu-results.json"
        self.data = data

    def attempt(self, name: str, measure: Callable[[], Any], trace: bool = False) -> Any:
        """``measure()``, or None when it raises: the error is recorded under ``name`` and logged
        (with a short traceback when ``trace``), and the run goes on."""
        try:
            return measure()
        except Exception as error:
            self.data["errors"].append(f"{name}: {type(error).__name__}: {error}")
            log(f"ERROR {name}: {type(error).__name__}: {error}" + (f"\n{traceback.format_exc(limit=4)}" if trace else ""))
            return None

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


class Clock:
    """Elapsed time since the start, and whether new work may still start."""

    def __init__(self, deadline_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def late(self) -> bool:
        return self.elapsed() > self.deadline_s


def device_error(device: str) -> str | None:
    """A sticky CUDA error (e.g. an illegal memory access in a kernel) leaves the device unusable
    for the rest of the process; returns its message, or None when the device still works."""
    if not device.startswith("cuda"):
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
        return None
    except Exception as error:
        return f"{type(error).__name__}: {str(error)[:300]}"


def run_correctness(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    found = gpu_correctness.run(args.device, smoke=args.smoke, report=log)
    results.data["correctness"] = found
    s = found["summary"]
    log(f"correctness: {s['passed']} passed, {s['passed_tf32']} passed only within the TF32 bound "
        f"({gpu_correctness.TF32_TOLERANCE:g}), {s['failed']} FAILED, of {s['total']}")
    if s["failed"]:
        log("!" * 78 + f"\n!!! {s['failed']} CORRECTNESS FAILURES: " + "; ".join(s["failures"][:20]) + "\n" + "!" * 78)


def _cudnn_benchmark(args: argparse.Namespace, results: Results, on: bool) -> None:
    """cuDNN's autotuner (its fastest algorithms: the strongest baseline) for the timings; off for
    the checks and the largest-batch search (a retune at every new shape, under the memory cap)."""
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = on
        results.data["env"]["cudnn_benchmark_in_timings"] = True


def run_layers(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    specs = SMOKE_LAYERS if args.smoke else layers.PAPER_SUITE + layers.OTHER
    batch = 2 if args.smoke else 32
    repeats = 1 if args.smoke else args.repeats
    rows = results.data.setdefault("layers", [])
    began = clock.elapsed()
    _cudnn_benchmark(args, results, True)
    for r in (2, 4):
        for dtype in (torch.float32, torch.bfloat16):
            for spec in specs:
                name = f"layer {spec.name} r={r} {dtype}"
                if clock.late() or clock.elapsed() - began > args.layers_budget_s:
                    results.data["skipped"].append(f"{name}: time budget")
                    continue
                row = results.attempt(name, lambda: layers.bench_layer(spec, r, batch, repeats, args.device, dtype))
                if row is None:
                    continue
                rows.append(row)
                log(f"{row['dtype']:8s} r={r} {spec.name:26s} bwd {row['bwd_vanilla_ms']:8.3f} -> "
                    f"{row['bwd_filtered_ms']:8.3f} ms ({row['bwd_speedup']:5.2f}x)  fwd {row['fwd_vanilla_ms']:7.3f} -> "
                    f"{row['fwd_filtered_ms']:7.3f} ms (x{row['fwd_overhead']:.2f})")
            results.save()
    for dtype in ("float32", "bfloat16"):
        at = [row for row in rows if row["dtype"] == dtype]
        if at:
            log(f"{dtype}: " + json.dumps(layers.summary(at)))


def _graphs_possible(args: argparse.Namespace, results: Results, section: str) -> bool:
    """CUDA graphs need a CUDA device: otherwise the section is listed as skipped, saying so."""
    if args.device.startswith("cuda"):
        return True
    results.data["skipped"].append(f"{section}: CUDA graphs need a CUDA device")
    log(f"SKIPPED {section}: CUDA graphs need a CUDA device")
    return False


def run_layers_graphed(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    if not _graphs_possible(args, results, "layers_graphed"):
        return
    rows = results.data.setdefault("layers_graphed", [])
    _cudnn_benchmark(args, results, True)
    for dtype in (torch.float32, torch.bfloat16):
        for r in (2, 4):
            for spec in layers.PAPER_SUITE + layers.OTHER:
                name = f"graphed layer {spec.name} r={r} {dtype}"
                if clock.late():
                    results.data["skipped"].append(f"{name}: time budget")
                    continue
                row = results.attempt(name, lambda: layers.bench_layer_graphed(spec, r, 32, 7, dtype))
                if row is None:
                    continue
                rows.append(row)
                log(f"graphed {row['dtype']:8s} r={r} {spec.name:26s} bwd {row['bwd_vanilla_ms']:7.3f} -> "
                    f"{row['bwd_filtered_ms']:7.3f} ms ({row['bwd_speedup']:5.2f}x)  fwd x{row['fwd_overhead']:.2f}")
            results.save()
            torch.cuda.empty_cache()


def _model_rows(names: tuple[str, ...], key: str, batch: int, size: int, args: argparse.Namespace,
                results: Results, clock: Clock) -> None:
    rows = results.data.setdefault(key, [])
    for name in names:
        if clock.late():
            results.data["skipped"].append(f"{key} {name}: time budget")
            continue
        spec = gpu_models.spec_named(name)
        row = results.attempt(f"{key} {name}", lambda: gpu_models.bench_model(
            spec, 2, batch, size, args.device, 1 if args.smoke else args.repeats, report=log), trace=True)
        if row is not None:
            rows.append(row)
        results.save()


def run_models(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    _cudnn_benchmark(args, results, True)
    batch, size = (2, 32) if args.smoke else (64, 224)
    _model_rows(TIMM, "models", batch, size, args, results, clock)


def run_segmentation(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    try:
        import segmentation_models_pytorch  # noqa: F401
    except Exception as error:
        reason = f"segmentation: segmentation_models_pytorch does not import ({type(error).__name__}: {error})"
        results.data["skipped"].append(reason)
        log(f"SKIPPED {reason}")
        return
    _cudnn_benchmark(args, results, True)
    batch, size = (2, 32) if args.smoke else (8, 512)
    _model_rows(SMP, "segmentation", batch, size, args, results, clock)


def run_budget(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    rows = results.data.setdefault("budget", [])
    _cudnn_benchmark(args, results, False)
    plan = [("timm resnet18", 224, 64, 4096)]
    try:
        import segmentation_models_pytorch  # noqa: F401

        plan.append(("smp UPerNet-resnet18", 512, 8, 512))
    except Exception as error:
        results.data["skipped"].append(f"budget smp UPerNet-resnet18: does not import ({type(error).__name__})")
    for name, size, start, cap in plan:
        if clock.late():
            results.data["skipped"].append(f"budget {name}: time budget")
            continue
        if args.smoke:
            size, start, cap = 32, 1, 2
        row = results.attempt(f"budget {name}", lambda: gpu_models.batch_in_budget(
            gpu_models.spec_named(name), 2, size, args.device, BUDGET_MIB, start, cap, args.budget_search_s,
            report=log), trace=True)
        if row is not None:
            rows.append(row)
        results.save()


def run_graphs(args: argparse.Namespace, results: Results, clock: Clock) -> None:
    if not _graphs_possible(args, results, "graphs"):
        return
    rows = results.data.setdefault("graphs", [])
    _cudnn_benchmark(args, results, True)
    batch, size = (2, 32) if args.smoke else (64, 224)
    for name in TIMM:
        if clock.late():
            results.data["skipped"].append(f"graphs {name}: time budget")
            continue
        row = results.attempt(f"graphs {name}", lambda: gpu_models.bench_graphed(
            gpu_models.spec_named(name), 2, batch, size, args.device, 1 if args.smoke else args.repeats, report=log))
        if row is not None:
            rows.append(row)
        results.save()


RUNNERS: dict[str, Callable[[argparse.Namespace, Results, Clock], None]] = {
    "correctness": run_correctness, "layers": run_layers, "layers_graphed": run_layers_graphed, "models": run_models,
    "segmentation": run_segmentation, "budget": run_budget, "graphs": run_graphs,
}


def _command(argv: list[str]) -> str:
    """The command line as it would be typed, with the output folder as ``$OUT``."""
    shown = list(argv)
    for i, arg in enumerate(shown[:-1]):
        if arg == "--out":
            shown[i + 1] = "$OUT"
    return "PYTHONPATH=. python3 -m benchmarks.gpu " + " ".join(shown)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu-results.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script itself, on any device")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per measurement (median)")
    parser.add_argument("--deadline-s", type=float, default=260.0, help="start no new measurement after this (s)")
    parser.add_argument("--layers-budget-s", type=float, default=90.0, help="time for the per-layer section")
    parser.add_argument("--budget-search-s", type=float, default=10.0, help="time per largest-batch search (s)")
    parser.add_argument("--docs-only", action="store_true", help="write docs/benchmarks-gpu.md from --json; run nothing")
    parser.add_argument("--json", default=str(gpu_docs.DOCS / "gpu-results.json"), help="results read by --docs-only")
    parser.add_argument("--docs", default=str(gpu_docs.DOCS), help="folder --docs-only writes benchmarks-gpu.md into")
    args = parser.parse_args(argv)
    if not args.docs_only and not args.out:
        parser.error("--out DIR is required (or --docs-only)")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.docs_only:
        path = gpu_docs.write_from_json(Path(args.json), Path(args.docs))
        log(f"wrote {path}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        log("no CUDA device here: use --device cpu (with --smoke) to check the script")
        return 2
    clock = Clock(args.deadline_s)
    cpu_kernels.set_enabled(False)  # measured is the device path; nothing to compile on the CPU
    results = Results(Path(args.out), {
        "command": _command(argv), "smoke": args.smoke, "env": environment(args.device), "skipped": [], "errors": [],
        "sections_done": [], "budget_mib": BUDGET_MIB,
    })
    log(json.dumps(results.data["env"]))
    results.save()
    for name in args.sections.split(","):
        log(f"== {name} (at {clock.elapsed():.0f} s)")
        try:
            RUNNERS[name](args, results, clock)
            results.data["sections_done"].append(name)
        except Exception as error:
            results.data["errors"].append(f"{name}: {type(error).__name__}: {error}")
            log(f"ERROR in section {name}: {type(error).__name__}: {error}\n{traceback.format_exc()}")
        results.data["elapsed_s"] = clock.elapsed()
        broken = device_error(args.device)
        if broken:
            results.data["errors"].append(f"after {name}: the device is unusable ({broken}); later sections not run")
            log(f"!!! the device is unusable after section {name} ({broken}): stopping")
        results.save()
        if broken:
            break
    failed = results.data.get("correctness", {}).get("summary", {}).get("failed", 0)
    log(f"done in {clock.elapsed():.0f} s; results in {results.path}")
    if results.data["skipped"]:
        log("skipped: " + "; ".join(results.data["skipped"]))
    if failed or results.data["errors"]:
        log("!" * 78 + f"\n!!! {failed} correctness failures, {len(results.data['errors'])} errors: "
            + "; ".join(results.data["errors"][:10]) + "\n" + "!" * 78)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
