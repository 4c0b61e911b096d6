"""``docs/benchmarks-gpu.md`` from the results of ``benchmarks/gpu.py`` (``gpu-results.json``).

Run alone: ``PYTHONPATH=. python3 -m benchmarks.gpu --docs-only [--json PATH]`` (copies PATH to
``docs/gpu-results.json`` when it lives elsewhere); ``make bench`` runs it too when
``docs/gpu-results.json`` exists.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

from benchmarks.layers import summary as layer_summary

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = "benchmarks-gpu.md"
VARIANTS = ("vanilla", "filter", "lean")
# Issue #8's targets for the device path.
TARGET_BWD_GEOMEAN = 4.0
TARGET_FWD_OVERHEAD = 1.10
# The line of docs/benchmarks.md that points here (or says how to make this page).
LINK_LINE = ("On a GPU (correctness on the device, per layer against cuDNN, memory kept and peak, largest batch "
             "in a budget): [benchmarks-gpu.md](benchmarks-gpu.md), from `benchmarks/gpu.py`.")
NO_RESULTS_LINE = ("No GPU results yet: `PYTHONPATH=. python3 -m benchmarks.gpu --out DIR` on a CUDA machine, then "
                   "`python3 -m benchmarks.gpu --docs-only --json DIR/gpu-results.json` writes benchmarks-gpu.md.")


def _num(value: Optional[float], fmt: str = ".0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, fmt)


def _change(new: Optional[float], old: Optional[float]) -> str:
    if new is None or not old:
        return "n/a"
    return f"{new / old - 1:+.0%}"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def environment_lines(data: dict) -> str:
    env = data.get("env", {})
    device = env.get("gpu") or f"CPU ({env.get('cpu', '?')})"
    if env.get("gpu_memory_mib"):
        device += f", {env['gpu_memory_mib'] / 1024:.0f} GiB, compute capability {env.get('capability')}"
    versions = ", ".join(f"{name} {env.get(key)}" for name, key in (
        ("torch", "torch"), ("CUDA", "cuda"), ("cuDNN", "cudnn"), ("Triton", "triton"), ("timm", "timm"),
        ("segmentation_models_pytorch", "segmentation_models_pytorch")))
    tuner = ("cuDNN autotuner (`cudnn.benchmark`) on for the timings, off for the checks and the largest-batch "
             "search" if env.get("cudnn_benchmark_in_timings") else "cuDNN autotuner off")
    flags = f"{tuner}; TF32 in cuDNN convs={env.get('tf32_cudnn')}, TF32 in matmuls={env.get('tf32_matmul')}"
    merged = "".join(
        f"\n- Sections {', '.join(item['sections'])} from an earlier run on the same machine: "
        f"`{item['command']}` ({item['date']}, commit `{item['commit']}`)" + (f"; {item['note']}" if item.get("note") else "")
        for item in data.get("merged", []))
    return (f"- Device: **{device}**\n- Versions: {versions}, Python {env.get('python')}\n- Settings: {flags}\n"
            f"- Date: {env.get('date')}; commit `{env.get('commit')}`; run took {_num(data.get('elapsed_s'))} s\n"
            f"- Command: `{data.get('command')}`{merged}")


def correctness_section(data: dict) -> str:
    found = data.get("correctness")
    if not found:
        return "Not run."
    s = found["summary"]
    tol = found.get("tolerance", {})
    lines = [
        f"{s['total']} checks: **{s['passed']} passed**, {s['passed_tf32']} passed only within the TF32 bound "
        f"({found.get('tf32_tolerance', 5e-3):g} instead of {tol.get('float32', 1e-4):g}), **{s['failed']} failed**. "
        f"A check is one layer configuration at one r, stride convention, dtype and input layout (contiguous or "
        f"channels_last): its gradients (x, weight, bias) against float64 results on the CPU (the loop-based "
        f"reference of `tests/helpers/reference.py` for {len(found.get('reference_cases', []))} small layers, the "
        f"library's float64 CPU path for {len(found.get('large_cases', []))} layers of realistic size), its "
        f"forward against `F.conv2d` on the device. Errors are relative L2 norms, worst over the checks.",
        "",
        "| dtype | checks | failed | bound | worst g_x | worst g_w | worst g_b | worst forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype, row in s["by_dtype"].items():
        lines.append(f"| {dtype} | {row['cases']} | {row['failed']} | {tol.get(dtype, 'n/a')} | {_num(row.get('g_x'), '.1e')} "
                     f"| {_num(row.get('g_w'), '.1e')} | {_num(row.get('g_b'), '.1e')} | {_num(row.get('fwd'), '.1e')} |")
    if s["failures"]:
        lines += ["", "Failed checks:", ""] + [f"- {name}" for name in s["failures"]]
    messages = sorted({m for case in found["cases"] for m in case.get("logs", [])})
    if messages:
        lines += ["", "Messages logged during the checks (e.g. a device kernel falling back):", ""]
        lines += [f"- `{m}`" for m in messages[:15]]
    return "\n".join(lines)


def layer_section(rows: list[dict], heading: str = "") -> str:
    if not rows:
        return "Not run."
    parts = []
    for dtype in ("float32", "bfloat16"):
        at = [row for row in rows if row["dtype"] == dtype]
        if not at:
            continue
        batch = at[0]["batch"]
        parts.append(f"### {heading}{dtype}, batch {batch}\n")
        for r, s in layer_summary(at).items():
            slower = [row["name"] for row in at if row["r"] == r and row["bwd_speedup"] < 1]
            parts.append(
                f"- r={r}: paper suite backward **{s['paper_bwd_geomean']:.2f}x** faster than cuDNN (geometric mean; "
                f"target {TARGET_BWD_GEOMEAN:g}x: {_met(s['paper_bwd_geomean'] >= TARGET_BWD_GEOMEAN)}); slowest layer "
                f"of any kind {s['slowest_bwd']:.2f}x ({s['slowest_layer']}; none slower than cuDNN: "
                f"{_met(not slower)}); forward time ratio {s['fwd_overhead_geomean']:.2f}x (geometric mean over all "
                f"layers; target at most {TARGET_FWD_OVERHEAD:.2f}x: {_met(s['fwd_overhead_geomean'] <= TARGET_FWD_OVERHEAD)})")
        parts.append("")
        parts.append("| layer | kind | r | fwd vanilla ms | fwd filtered ms | fwd ratio | bwd vanilla ms | bwd filtered ms "
                     "| bwd speed-up |")
        parts.append("|---|---|---|---|---|---|---|---|---|")
        for row in at:
            parts.append(f"| {row['name']} | {row['kind']} | {row['r']} | {row['fwd_vanilla_ms']:.3f} | "
                         f"{row['fwd_filtered_ms']:.3f} | {row['fwd_overhead']:.2f}x | {row['bwd_vanilla_ms']:.3f} | "
                         f"{row['bwd_filtered_ms']:.3f} | **{row['bwd_speedup']:.2f}x** |")
        parts.append("")
    return "\n".join(parts)


def _triple(row: dict, key: str, fmt: str = ".0f") -> str:
    return " / ".join(_num(row.get(f"{key}_{v}"), fmt) for v in VARIANTS)


def _above_base(row: dict, key: str, variant: str) -> Optional[float]:
    """A peak minus what was allocated before the step (``None`` when either is missing)."""
    peak, base = row.get(f"{key}_{variant}"), row.get(f"base_mib_{variant}")
    return None if peak is None or base is None else peak - base


def _step_peaks(row: dict) -> dict:
    """``step_peak_mib_{variant}``: the step's peak above the memory held before it."""
    return {f"step_peak_mib_{v}": _above_base(row, "peak_mib", v) for v in VARIANTS}


def model_section(rows: list[dict]) -> str:
    if not rows:
        return "Not run."
    out = ["| model | depth | input | batch | kept when forward ends, MiB (vanilla / filter / lean) | lean vs vanilla "
           "| peak of the step, MiB (vanilla / filter / lean) | lean vs vanilla | saved by autograd, MiB "
           "(vanilla / filter / lean) | step ms (vanilla / filter / lean) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peaks = _step_peaks(row)
        out.append(
            f"| {row['model']} | {row['depth']} | {row['size']} | {row['batch']} | {_triple(row, 'kept_mib')} "
            f"| **{_change(row.get('kept_mib_lean'), row.get('kept_mib_vanilla'))}** | {_triple(peaks, 'step_peak_mib')} "
            f"| **{_change(peaks['step_peak_mib_lean'], peaks['step_peak_mib_vanilla'])}** "
            f"| {_triple(row, 'graph_kept_mib', '.1f')} | {_triple(row, 'step_ms', '.1f')} |")
    return "\n".join(out)


def peak_phase_section(rows: list[dict]) -> str:
    """Whether the step's peak comes in the forward or in the backward, vanilla and lean."""
    rows = [row for row in rows if row.get("peak_forward_mib_vanilla") is not None]
    if not rows:
        return "Not measured."
    out = ["| model | forward peak, MiB (vanilla / lean) | backward peak, MiB (vanilla / lean) "
           "| the step's peak is in (vanilla / lean) |", "|---|---|---|---|"]
    for row in rows:
        fwd = {v: _above_base(row, "peak_forward_mib", v) for v in ("vanilla", "lean")}
        bwd = {v: _above_base(row, "peak_backward_mib", v) for v in ("vanilla", "lean")}
        where = " / ".join("forward" if fwd[v] >= bwd[v] else "backward" for v in ("vanilla", "lean"))
        out.append(f"| {row['model']} | {_num(fwd['vanilla'])} / {_num(fwd['lean'])} "
                   f"| {_num(bwd['vanilla'])} / {_num(bwd['lean'])} | {where} |")
    return "\n".join(out)


def graph_section(rows: list[dict]) -> str:
    if not rows:
        return "Not run."
    out = ["| model | batch | eager step ms (vanilla / lean) | CUDA graph step ms (vanilla / lean) | lean vs vanilla, graphed |",
           "|---|---|---|---|---|"]
    notes = []
    for row in rows:
        gv, gl = row.get("step_ms_graph_vanilla"), row.get("step_ms_graph_lean")
        ratio = f"{gl / gv:.2f}x" if gv and gl else "n/a"
        out.append(f"| {row['model']} | {row['batch']} | {_num(row.get('step_ms_eager_vanilla'), '.1f')} / "
                   f"{_num(row.get('step_ms_eager_lean'), '.1f')} | {_num(gv, '.1f')} / {_num(gl, '.1f')} | {ratio} |")
        notes += [f"- {row['model']}, {k[len('graph_error_'):]}: capture failed: `{v}`" for k, v in row.items()
                  if k.startswith("graph_error_")]
    return "\n".join(out + ([""] + notes if notes else []))


def budget_section(rows: list[dict]) -> str:
    if not rows:
        return "Not run."
    out = ["| model | depth | input | budget MiB | largest batch, vanilla | largest batch, lean | lean vs vanilla |",
           "|---|---|---|---|---|---|---|"]
    for row in rows:
        def shown(v: str) -> str:
            capped = row.get(f"capped_{v}")
            return f"{row[f'batch_{v}']}" + (f" (search stopped: {capped})" if capped else "")

        ratio = f"{row['batch_lean'] / row['batch_vanilla']:.2f}x" if row.get("batch_vanilla") else "n/a"
        out.append(f"| {row['model']} | {row['depth']} | {row['size']} | {row['budget_mib']:.0f} | {shown('vanilla')} "
                   f"| {shown('lean')} | {ratio} |")
    return "\n".join(out)


def render(data: dict[str, Any]) -> str:
    """The whole page, from a results dictionary."""
    smoke = ("\n> **Smoke run** (tiny sizes, to check the script): these numbers measure nothing.\n"
             if data.get("smoke") else "")
    problems = "".join(f"- {item}\n" for item in data.get("errors", []))
    skipped = "".join(f"- {item}\n" for item in data.get("skipped", []))
    return f"""# Benchmarks on a GPU
{smoke}
Written by `python3 -m benchmarks.gpu --docs-only` from [gpu-results.json](gpu-results.json)
(raw rows), which `benchmarks/gpu.py` wrote on the device:

{environment_lines(data)}

Every ratio compares two contenders timed in turn in the same run (median of repeats, CUDA
events). Vanilla = PyTorch's own conv (cuDNN); filtered = `lightning_gf.ops.conv.filtered_conv2d`.

## Correctness on the device

{correctness_section(data)}

## Per layer: filtered_conv2d vs cuDNN

Backward = `torch.autograd.grad` of the layer's output with respect to input, weight and
bias (everything the filtered op does is included); the filtered forward pools its input
on every call. The paper's suite is 3x3, stride 1, Cin = Cout.

{layer_section(data.get("layers", []))}

### Per layer under CUDA graphs: the GPU's time alone

The same layers, each contender captured once as a CUDA graph and replayed
(`benchmarks.timing.cuda_graph_ms`): what the kernels cost on the GPU without the
Python and launch costs of eager mode on the CPU, as in a graphed or compiled training
step. Backward = (forward + backward) - forward.

{layer_section(data.get("layers_graphed", []), heading="CUDA graphs, ")}

## End to end: memory kept, peak, step time

r = 2, BatchNorm in eval mode, the same trainable set in every variant: `vanilla` is plain
backprop (`handle.plain()`), `filter` the filtered convs alone (`lean=False`), `lean` the
default. A step is forward, backward of a mean-square loss and an SGD step (eager). "Kept"
= `torch.cuda.memory_allocated()` when forward ends minus before it; "peak" =
`torch.cuda.max_memory_allocated()` over the step minus `memory_allocated()` before it: what
the step itself adds on top of the weights, optimizer state and input, each variant alone on
the device; "saved by autograd" = the distinct storages the graph saves
(`SavedTensorMeter`, parameters excluded). (The absolute figures are in the raw rows; in
the run below they also hold memory that earlier measurements leaked: the meter kept the
graph of its forward, fixed since, so only figures above the step's own start compare.)

{model_section(data.get("models", []) + data.get("segmentation", []))}

### Where the peak is

The step's peak split in two: up to the loss (forward), and backward with the SGD step.
The forward's peak holds the frozen part's and the trained region's transient maps, which
no filter changes; what the lean region saves shows in the backward's peak. cuDNN's
autotuner is off while memory is measured (its trial workspaces would count).

{peak_phase_section(data.get("models", []) + data.get("segmentation", []))}

### Step time under CUDA graphs

The whole step (forward, backward, SGD step) captured once and replayed.

{graph_section(data.get("graphs", []))}

## Largest batch in a budget

Found by trying: the allocator is capped at the budget
(`torch.cuda.set_per_process_memory_fraction`), and a batch fits when two training steps
run without `torch.cuda.OutOfMemoryError` (doubling, then bisecting to 1/16 of the answer).

{budget_section(data.get("budget", []))}

## Skipped, errors

{skipped or "Nothing skipped."}
{problems or "No errors."}
"""


def write_from_json(json_path: Path, docs: Path = DOCS) -> Path:
    """Write ``docs/benchmarks-gpu.md`` from a results file; returns the page's path.

    A results file outside ``docs`` is copied to ``docs/gpu-results.json`` first (the page links it).
    """
    docs.mkdir(parents=True, exist_ok=True)
    committed = docs / "gpu-results.json"
    if json_path.resolve() != committed.resolve():
        shutil.copyfile(json_path, committed)
    data = json.loads(committed.read_text())
    page = docs / PAGE
    page.write_text(render(data))
    link_from_benchmarks(docs / "benchmarks.md")
    return page


def link_from_benchmarks(benchmarks_md: Path) -> None:
    """Make ``benchmarks.md`` (written by ``make bench``) link this page, without rerunning it."""
    if not benchmarks_md.exists():
        return
    text = benchmarks_md.read_text()
    if LINK_LINE in text:
        return
    if NO_RESULTS_LINE in text:
        text = text.replace(NO_RESULTS_LINE, LINK_LINE)
    else:  # a page from before this link existed: after its opening paragraphs
        head, sep, rest = text.partition("\n## ")
        text = head.rstrip("\n") + "\n\n" + LINK_LINE + "\n\n" + sep.lstrip("\n") + rest
    benchmarks_md.write_text(text)
