"""Whole models on a device: training-step time, memory kept when forward ends, the step's peak,
and the largest batch that fits a memory budget.

Variants of one model (as ``benchmarks/models.py``): ``vanilla`` (plain backprop on the same
trainable set, ``handle.plain()``), ``filter`` (``lean=False``) and ``lean`` (the default).
A training step is forward, backward of a mean-square loss and an SGD step (momentum 0.9).
"""

from __future__ import annotations

import copy
import gc
import time
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
from torch import nn

from benchmarks.models import MODELS, ModelSpec, _loss, kept_bytes
from benchmarks.timing import cuda_median_ms, median_ms
from lightning_gf import apply_gradient_filter

MIB = 2**20
VARIANTS = ("vanilla", "filter", "lean")


def spec_named(name: str) -> ModelSpec:
    return next(spec for spec in MODELS if spec.name == name)


class Trainee:
    """One variant of a model: the patched module, its handle, an optimizer and a step."""

    def __init__(self, net: nn.Module, spec: ModelSpec, variant: str, r: int, example: torch.Tensor) -> None:
        self.variant = variant
        self.model = copy.deepcopy(net)
        self.handle = apply_gradient_filter(self.model, r=r, depth=spec.depth, example_input=example,
                                            lean=variant == "lean")
        self.model.train()
        self.opt: Optional[torch.optim.Optimizer] = None

    def to(self, device: str) -> "Trainee":
        self.model.to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)  # fresh state on the model's device
        return self

    def context(self) -> Any:
        return self.handle.plain() if self.variant == "vanilla" else nullcontext()

    def step(self, x: torch.Tensor) -> None:
        assert self.opt is not None, "call .to(device) first"
        with self.context():
            loss = _loss(self.model(x))
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _free(device: str, collect: bool = True) -> None:
    """Give cached device memory back; ``collect`` first frees unreachable cycles (slow with many objects)."""
    if collect:
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_memory(trainee: Trainee, x: torch.Tensor, device: str) -> dict:
    """Memory of one training step with only this model, its optimizer state and ``x`` on the device.

    ``base``: allocated before the step; ``kept``: allocated when forward ends minus base
    (what the graph keeps, plus the tiny loss); ``peak``: ``max_memory_allocated`` over the
    whole step (absolute, so it includes base), also split into ``peak_forward`` (up to the
    loss) and ``peak_backward`` (backward and the optimizer step); ``graph_kept``: the
    storages autograd saves (``SavedTensorMeter``, parameters and buffers left out). CUDA
    figures are None on other devices. cuDNN's autotuner is off here: its trial workspaces
    would count in the peak.
    """
    tuned = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        return _measure_memory(trainee, x, device)
    finally:
        torch.backends.cudnn.benchmark = tuned


def _measure_memory(trainee: Trainee, x: torch.Tensor, device: str) -> dict:
    trainee.step(x)  # optimizer state, cuDNN algorithm choice, lazily built caches
    trainee.step(x)
    out: dict[str, Optional[float]] = {"base_mib": None, "kept_mib": None, "peak_mib": None}
    with trainee.context():
        graph_kept, output = kept_bytes(trainee.model, x)
    del output
    out["graph_kept_mib"] = graph_kept / MIB
    if device.startswith("cuda"):
        _free(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with trainee.context():
            loss = _loss(trainee.model(x))
            torch.cuda.synchronize()
            after_forward = torch.cuda.memory_allocated()
            forward_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            loss.backward()
        del loss
        assert trainee.opt is not None
        trainee.opt.step()
        trainee.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        backward_peak = torch.cuda.max_memory_allocated()
        out.update(base_mib=base / MIB, kept_mib=(after_forward - base) / MIB,
                   peak_mib=max(forward_peak, backward_peak) / MIB, peak_forward_mib=forward_peak / MIB,
                   peak_backward_mib=backward_peak / MIB)
    return out


def graphed_step(trainee: Trainee, x: torch.Tensor) -> Callable[[], None]:
    """The whole training step captured as one CUDA graph; returns its replay."""
    assert trainee.opt is not None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            trainee.step(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    trainee.opt.zero_grad(set_to_none=True)
    with trainee.context(), torch.cuda.graph(graph):
        loss = _loss(trainee.model(x))
        loss.backward()
        trainee.opt.step()
    return graph.replay


def build(spec: ModelSpec, r: int, size: int, variants=VARIANTS) -> dict[str, Trainee]:
    """The variants of one model, on the CPU (same initial weights)."""
    torch.manual_seed(0)
    net = spec.build()
    example = torch.randn(1, 3, size, size)
    return {v: Trainee(net, spec, v, r, example) for v in variants}


def bench_model(spec: ModelSpec, r: int, batch: int, size: int, device: str, repeats: int,
                report: Callable[[str], None] = print) -> dict:
    """Memory (each variant alone on the device), then step times (the variants in turn)."""
    trainees = build(spec, r, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    row: dict[str, Any] = {"model": spec.name, "depth": spec.depth, "size": size, "batch": batch, "r": r,
                           "device": device}
    for v, trainee in trainees.items():
        trainee.to(device)
        for key, value in measure_memory(trainee, x, device).items():
            row[f"{key}_{v}"] = value
        trainee.to("cpu")
        _free(device, collect=False)  # measure_memory collects before it measures
    for trainee in trainees.values():
        trainee.to(device)
    timer = cuda_median_ms if device.startswith("cuda") else median_ms
    times = timer({v: (lambda t=t: t.step(x)) for v, t in trainees.items()}, repeats)
    for v in VARIANTS:
        row[f"step_ms_{v}"] = times[v]
    for v in ("filter", "lean"):
        for key in ("kept_mib", "peak_mib", "graph_kept_mib"):
            if row.get(f"{key}_vanilla") and row.get(f"{key}_{v}") is not None:
                row[f"{key}_change_{v}"] = row[f"{key}_{v}"] / row[f"{key}_vanilla"] - 1
    report(_row_line(row))
    return row


def _mib(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _row_line(row: dict) -> str:
    kept = "/".join(_mib(row.get(f"kept_mib_{v}")) for v in VARIANTS)
    peak = "/".join(_mib(row.get(f"peak_mib_{v}")) for v in VARIANTS)
    graph = "/".join(f"{row[f'graph_kept_mib_{v}']:.1f}" for v in VARIANTS)
    step = "/".join(f"{row[f'step_ms_{v}']:.1f}" for v in VARIANTS)
    return (f"{row['model']:26s} b={row['batch']} {row['size']}px  kept {kept} MiB (graph {graph})  "
            f"peak {peak} MiB  step {step} ms  (vanilla/filter/lean)")


def bench_graphed(spec: ModelSpec, r: int, batch: int, size: int, device: str, repeats: int,
                  report: Callable[[str], None] = print) -> dict:
    """Step time under CUDA graphs (whole step captured), vanilla and lean; eager alongside."""
    trainees = build(spec, r, size, variants=("vanilla", "lean"))
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    row: dict[str, Any] = {"model": spec.name, "depth": spec.depth, "size": size, "batch": batch, "r": r}
    for trainee in trainees.values():
        trainee.to(device)
    eager = cuda_median_ms({v: (lambda t=t: t.step(x)) for v, t in trainees.items()}, repeats)
    graphs: dict[str, Callable[[], None]] = {}
    for v, trainee in trainees.items():
        try:
            graphs[v] = graphed_step(trainee, x)
        except Exception as error:  # capture refused (a sync, a CPU tensor...): say why
            row[f"graph_error_{v}"] = f"{type(error).__name__}: {str(error)[:300]}"
            try:
                torch.cuda.synchronize()
            except Exception:  # the failed capture may have left an error on the stream; reported above
                pass
    replays = cuda_median_ms(graphs, repeats) if graphs else {}
    for v in trainees:
        row[f"step_ms_eager_{v}"] = eager[v]
        row[f"step_ms_graph_{v}"] = replays.get(v)
    report(f"{spec.name:26s} step eager " + "/".join(f"{eager[v]:.1f}" for v in trainees) + " ms, CUDA graph "
           + "/".join("failed" if replays.get(v) is None else f"{replays[v]:.1f}" for v in trainees)
           + " ms (vanilla/lean)" + "".join(f"  [{k}: {v}]" for k, v in row.items() if k.startswith("graph_error")))
    return row


def largest_batch(fits: Callable[[int], bool], start: int, cap: int, seconds: float) -> dict:
    """The largest batch ``b <= cap`` with ``fits(b)``: doubling from ``start``, then bisecting
    down to a step of 1/16 of the answer; stops early after ``seconds`` (``capped`` says why).

    Example:
        >>> largest_batch(lambda b: b <= 100, start=8, cap=1024, seconds=10)["batch"]
        100
    """
    began = time.perf_counter()
    tries: list[tuple[int, bool]] = []

    def attempt(b: int) -> bool:
        ok = fits(b)
        tries.append((b, ok))
        return ok

    def out_of_time() -> bool:
        return time.perf_counter() - began > seconds

    if not attempt(start):
        return {"batch": 0, "tries": tries, "capped": None}
    lo, hi = start, None
    while hi is None:
        if lo >= cap:
            return {"batch": lo, "tries": tries, "capped": "cap"}
        if out_of_time():
            return {"batch": lo, "tries": tries, "capped": "time"}
        nxt = min(lo * 2, cap)
        if attempt(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > max(1, lo // 16):
        if out_of_time():
            return {"batch": lo, "tries": tries, "capped": "time"}
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    return {"batch": lo, "tries": tries, "capped": None}


def _two_steps_fit(trainee: Trainee, batch: int, size: int, device: str) -> bool:
    """Whether two training steps at ``batch`` run without running out of device memory.
    (Returning frees the failed step's tensors with the exception.)"""
    try:
        x = torch.randn(batch, 3, size, size, device=device)
        trainee.step(x)
        trainee.step(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    except RuntimeError as error:  # a library's own allocation (cuBLAS, cuDNN) failing says it differently
        if "out of memory" in str(error).lower() or "ALLOC_FAILED" in str(error):
            return False
        raise


def _device_index(device: str) -> int:
    """The CUDA device index of ``device`` (``"cuda"`` means the current one)."""
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def batch_in_budget(spec: ModelSpec, r: int, size: int, device: str, budget_mib: float, start: int, cap: int,
                    seconds: float, report: Callable[[str], None] = print) -> dict:
    """Largest batch whose training step fits ``budget_mib`` of device memory, vanilla and lean.

    On CUDA the budget is enforced with ``torch.cuda.set_per_process_memory_fraction``; a batch
    fits when two training steps run without ``torch.cuda.OutOfMemoryError``. Each variant is
    alone on the device while it is tried.
    """
    on_cuda = device.startswith("cuda")
    row: dict[str, Any] = {"model": spec.name, "depth": spec.depth, "size": size, "r": r, "budget_mib": budget_mib}
    if on_cuda:
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        row["device_total_mib"] = total / MIB
    for v, trainee in build(spec, r, size, variants=("vanilla", "lean")).items():
        trainee.to(device)

        def fits(b: int, trainee: Trainee = trainee) -> bool:
            ok = _two_steps_fit(trainee, b, size, device)
            assert trainee.opt is not None
            trainee.opt.zero_grad(set_to_none=True)  # an out-of-memory step may leave some gradients
            _free(device, collect=False)  # the failed step's tensors went with its frames
            return ok

        if on_cuda:
            _free(device)
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mib * MIB / total), _device_index(device))
        try:
            found = largest_batch(fits, start, cap, seconds)
        finally:
            if on_cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, _device_index(device))
        row[f"batch_{v}"] = found["batch"]
        row[f"tries_{v}"] = found["tries"]
        row[f"capped_{v}"] = found["capped"]
        trainee.to("cpu")
        del trainee
        _free(device, collect=False)
    report(f"{spec.name:26s} {size}px largest batch in {budget_mib:.0f} MiB: vanilla {row['batch_vanilla']}"
           f"{' (' + row['capped_vanilla'] + ' reached)' if row['capped_vanilla'] else ''}, lean {row['batch_lean']}"
           f"{' (' + row['capped_lean'] + ' reached)' if row['capped_lean'] else ''}")
    return row
