"""Correctness of ``filtered_conv2d`` on a device, against float64 results computed on the CPU.

Two tiers of layer configurations:

- ``reference``: small layers, compared with the independent float64 reference
  ``tests.helpers.reference.reference_grads`` (explicit patch loops: slow, so the layers are small);
- ``large``: layers of realistic size (so that every tile and block of a device kernel
  is exercised), compared with the library's own float64 CPU path (plain PyTorch,
  itself tested against that reference by ``tests/ops/test_functional.py``).

Every configuration runs in float32, bfloat16 and float16, with a contiguous and a
channels_last input, for each ``r`` and stride convention listed. The inputs are
rounded to bfloat16 once, so that every dtype sees exactly the same numbers and the
float64 result is the exact answer for all of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from lightning_gf.backends import cpu as cpu_kernels
from lightning_gf.ops.conv import filtered_conv2d

Padding = Union[int, str]

# Relative L2 error bounds of the gradients (and of the forward) per dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
TF32_TOLERANCE = 5e-3  # float32 products may run in TF32 on a GPU
FORWARD_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ConvCase:
    """One layer geometry and the filter settings it is checked with."""

    name: str
    n: int
    c_in: int
    c_out: int
    size: tuple[int, int]
    k: int = 3
    stride: int = 1
    padding: Padding = 1
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    rs: tuple[int, ...] = (2, 4)
    corrections: tuple[bool, ...] = (True,)


# Small enough for the loop-based reference (well under 0.1 s each on one core).
REFERENCE_CASES = [
    ConvCase("dense 3x3", 2, 4, 4, (12, 12)),
    ConvCase("dense 3x3 no bias", 2, 4, 6, (12, 12), bias=False),
    ConvCase("grouped g=2", 2, 4, 6, (12, 12), groups=2),
    ConvCase("depthwise", 2, 8, 8, (12, 12), groups=8),
    ConvCase("depth multiplier x2", 2, 4, 8, (12, 12), groups=4),
    ConvCase("3x3 s2", 2, 4, 6, (13, 12), stride=2, corrections=(True, False)),
    ConvCase("1x1 s2", 2, 6, 4, (12, 12), k=1, stride=2, padding=0, corrections=(True, False)),
    ConvCase("dilated d2", 2, 4, 4, (12, 12), padding=2, dilation=2),  # d < r at r=4, d >= r at r=2
    ConvCase("dilated d4", 2, 4, 4, (16, 16), padding=4, dilation=4),  # d >= r at r=2 and r=4
    ConvCase("depthwise dilated d4", 2, 4, 4, (16, 16), padding=4, dilation=4, groups=4),
    ConvCase("padding same", 2, 4, 4, (11, 13), padding="same"),
    ConvCase("padding valid", 2, 4, 4, (13, 11), padding="valid"),
    ConvCase("1x1", 2, 6, 4, (11, 11), k=1, padding=0),
    ConvCase("overhang 5x5", 2, 3, 4, (15, 9), k=5, padding=2),
]

# Realistic sizes, against the library's float64 CPU path.
LARGE_CASES = [
    ConvCase("dense 3x3 64x56x56", 4, 64, 64, (56, 56)),
    ConvCase("dense 3x3 96x30x46 (overhang)", 4, 96, 80, (30, 46)),
    ConvCase("depthwise 144x56x56", 4, 144, 144, (56, 56), groups=144, bias=False),
    ConvCase("depthwise 960x7x7", 4, 960, 960, (7, 7), groups=960, bias=False),
    ConvCase("grouped g=4 128x28x28", 4, 128, 128, (28, 28), groups=4),
    ConvCase("1x1 64->256 56x56", 4, 64, 256, (56, 56), k=1, padding=0, bias=False),
    ConvCase("3x3 s2 128->256 57x57", 4, 128, 256, (57, 57), stride=2, corrections=(True, False)),
    ConvCase("1x1 s2 256->512 14x14", 4, 256, 512, (14, 14), k=1, stride=2, padding=0),
    ConvCase("3x3 d12 128->64 40x40", 2, 128, 64, (40, 40), padding=12, dilation=12),
    ConvCase("3x3 d2 64x33x33", 4, 64, 64, (33, 33), padding=2, dilation=2),
]

SMOKE_REFERENCE = [REFERENCE_CASES[i] for i in (3, 5, 8)]
SMOKE_LARGE = [ConvCase("3x3 s2 8x21x21", 2, 8, 8, (21, 21), stride=2, rs=(2,))]


@dataclass
class CaseResult:
    tier: str
    case: str
    r: int
    stride_correction: bool
    dtype: str
    layout: str
    forward_err: float
    grad_err: dict[str, float]
    status: str  # PASS, PASS-TF32 (float32 within the TF32 bound only) or FAIL
    logs: list[str] = field(default_factory=list)

    def line(self) -> str:
        errs = " ".join(f"{k}={v:.1e}" for k, v in self.grad_err.items())
        corr = "" if self.stride_correction else " paper-scale"
        return (f"{self.status:9s} {self.tier:9s} {self.case:30s} r={self.r}{corr} {self.dtype:8s} {self.layout:13s} "
                f"fwd={self.forward_err:.1e} {errs}")


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (absolute error when ``want`` is zero)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = torch.linalg.vector_norm(got - want).item()
    norm = torch.linalg.vector_norm(want).item()
    return diff / norm if norm > 0 else diff


def _data(case: ConvCase, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], dict]:
    """float64 inputs already rounded to bfloat16 (exact in float16 and float32 too)."""
    g = torch.Generator().manual_seed(seed)

    def rounded(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16).double()

    x = rounded(case.n, case.c_in, *case.size)
    w = rounded(case.c_out, case.c_in // case.groups, case.k, case.k, scale=1 / math.sqrt(case.c_in // case.groups * case.k**2))
    b = rounded(case.c_out) if case.bias else None
    conv = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    return x, w, b, conv


def _reference(x, w, b, gy, conv: dict, r: int, stride_correction: bool):
    from tests.helpers.reference import reference_grads

    return reference_grads(x, w, b, gy, stride=(conv["stride"],) * 2, padding=conv["padding"],
                           dilation=(conv["dilation"],) * 2, groups=conv["groups"], r=r,
                           stride_correction=stride_correction)


def _library_cpu(x, w, b, gy, conv: dict, r: int, stride_correction: bool):
    """The library's float64 CPU path, plain PyTorch (no compiled kernels: nothing to build)."""
    previous = cpu_kernels.set_enabled(False)
    try:
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        y = filtered_conv2d(*leaves, **conv, r=r, stride_correction=stride_correction)
        y.backward(gy)
        return tuple(t.grad if t is not None else None for t in leaves)
    finally:
        cpu_kernels.set_enabled(previous)


class _Collect(logging.Handler):
    """Keeps the library's log messages (e.g. a device kernel falling back) for one case."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _on_device(x, w, b, gy, conv, r, stride_correction, device, dtype, channels_last):
    """Forward output, ``F.conv2d``'s output and the gradients of ``filtered_conv2d`` on ``device``."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xd = x.to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
    wd = w.to(device, dtype).requires_grad_()
    bd = b.to(device, dtype).requires_grad_() if b is not None else None
    y = filtered_conv2d(xd, wd, bd, **conv, r=r, stride_correction=stride_correction)
    with torch.no_grad():
        y_plain = F.conv2d(xd, wd, bd, **conv)
    y.backward(gy.to(device, dtype).contiguous(memory_format=fmt))
    grads = {"g_x": xd.grad, "g_w": wd.grad}
    if bd is not None:
        grads["g_b"] = bd.grad
    layout_kept = xd.grad is not None and (not channels_last or xd.grad.is_contiguous(memory_format=fmt))
    return y, y_plain, grads, layout_kept


def _status(dtype: str, errors: list[float], forward_err: float) -> str:
    if not all(math.isfinite(e) for e in errors + [forward_err]) or forward_err > FORWARD_TOLERANCE[dtype]:
        return "FAIL"
    worst = max(errors)
    if worst < TOLERANCE[dtype]:
        return "PASS"
    if dtype == "float32" and worst < TF32_TOLERANCE:
        return "PASS-TF32"
    return "FAIL"


def check_case(case: ConvCase, tier: str, device: str, dtypes: list[str]) -> list[CaseResult]:
    """Every (r, stride convention, dtype, layout) of one case, against its float64 answer."""
    x, w, b, conv = _data(case)
    expected_of: Callable = _reference if tier == "reference" else _library_cpu
    results = []
    for r in case.rs:
        for correction in case.corrections:
            y64 = F.conv2d(x, w, b, **conv)
            gy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).double()
            want = dict(zip(("g_x", "g_w", "g_b"), expected_of(x, w, b, gy, conv, r, correction)))
            for dtype in dtypes:
                for channels_last in (False, True):
                    collect = _Collect()
                    logger = logging.getLogger("lightning_gf")
                    level = logger.level
                    logger.addHandler(collect)
                    logger.setLevel(logging.DEBUG)
                    try:
                        y, y_plain, grads, layout_kept = _on_device(
                            x, w, b, gy, conv, r, correction, device, DTYPES[dtype], channels_last)
                    finally:
                        logger.removeHandler(collect)
                        logger.setLevel(level)
                    errors = {k: rel_l2(v, want[k]) for k, v in grads.items()}
                    forward_err = rel_l2(y, y_plain)
                    status = _status(dtype, list(errors.values()), forward_err)
                    logs = collect.messages
                    if not layout_kept:
                        logs = logs + ["g_x did not come back channels_last"]
                    results.append(CaseResult(tier, case.name, r, correction, dtype,
                                              "channels_last" if channels_last else "contiguous",
                                              forward_err, errors, status, logs))
    return results


def _report_case(found: list[CaseResult], report: Callable[[str], None]) -> None:
    """One line per (r, stride convention) of a case: its worst status and, per dtype, its worst
    gradient error over both layouts; then every failing variant in full."""
    groups: dict[tuple[int, bool], list[CaseResult]] = {}
    for result in found:
        groups.setdefault((result.r, result.stride_correction), []).append(result)
    for (r, correction), results in groups.items():
        statuses = {res.status for res in results}
        status = "FAIL" if "FAIL" in statuses else "PASS-TF32" if "PASS-TF32" in statuses else "PASS"
        worst: dict[str, float] = {}
        for res in results:
            worst[res.dtype] = max([worst.get(res.dtype, 0.0), res.forward_err, *res.grad_err.values()])
        errs = " | ".join(f"{dtype} {err:.1e}" for dtype, err in worst.items())
        corr = " paper-scale" if not correction else ""
        first = results[0]
        report(f"{status:9s} {first.tier:9s} {first.case:30s} r={r}{corr}: {errs}")
        for res in results:
            if res.status == "FAIL" or res.logs:
                report(f"    {res.line()}" + ("  # " + " | ".join(res.logs[:3]) if res.logs else ""))


def run(device: str, smoke: bool = False, dtypes: Optional[list[str]] = None,
        report: Callable[[str], None] = print) -> dict:
    """Check every case; returns ``{"cases": [...], "summary": {...}}`` (JSON-ready)."""
    dtypes = dtypes or list(DTYPES)
    tiers = [("reference", SMOKE_REFERENCE if smoke else REFERENCE_CASES),
             ("large", SMOKE_LARGE if smoke else LARGE_CASES)]
    cases: list[CaseResult] = []
    for tier, specs in tiers:
        for spec in specs:
            try:
                found = check_case(spec, tier, device, dtypes)
            except Exception as error:  # a crash is a failure of every variant of the case
                found = [CaseResult(tier, spec.name, 0, True, "all", "all", float("nan"), {}, "FAIL",
                                    [f"{type(error).__name__}: {error}"])]
            _report_case(found, report)
            cases.extend(found)
    return {"cases": [asdict(c) for c in cases], "summary": summarize([asdict(c) for c in cases]),
            "tolerance": TOLERANCE, "tf32_tolerance": TF32_TOLERANCE, "forward_tolerance": FORWARD_TOLERANCE,
            "reference_cases": [asdict(c) for c in (SMOKE_REFERENCE if smoke else REFERENCE_CASES)],
            "large_cases": [asdict(c) for c in (SMOKE_LARGE if smoke else LARGE_CASES)]}


def summarize(cases: list[dict]) -> dict:
    """Counts per status, and per dtype the worst error of each gradient and of the forward."""
    out: dict = {"total": len(cases), "passed": 0, "passed_tf32": 0, "failed": 0, "by_dtype": {}}
    for case in cases:
        out[{"PASS": "passed", "PASS-TF32": "passed_tf32", "FAIL": "failed"}[case["status"]]] += 1
        row = out["by_dtype"].setdefault(case["dtype"], {"cases": 0, "failed": 0, "fwd": 0.0})
        row["cases"] += 1
        row["failed"] += case["status"] == "FAIL"
        if math.isfinite(case["forward_err"]):
            row["fwd"] = max(row["fwd"], case["forward_err"])
        for name, err in case["grad_err"].items():
            row[name] = max(row.get(name, 0.0), err)
    out["failures"] = [f"{c['tier']} {c['case']} r={c['r']} sc={c['stride_correction']} {c['dtype']} {c['layout']}"
                       for c in cases if c["status"] == "FAIL"]
    return out
