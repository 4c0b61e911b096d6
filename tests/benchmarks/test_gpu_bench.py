"""The device benchmark (``benchmarks/gpu*.py``) without a device: its checker, its batch search,
its tables, and a whole ``--smoke --device cpu`` run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu, gpu_correctness, gpu_docs, gpu_models
from lightning_gf.ops.conv import filtered_conv2d


def test_status_bounds_per_dtype():
    status = gpu_correctness._status
    assert status("float32", [5e-5, 1e-7], 0.0) == "PASS"
    assert status("float32", [2e-4, 1e-7], 0.0) == "PASS-TF32"
    assert status("float32", [6e-3, 1e-7], 0.0) == "FAIL"
    assert status("bfloat16", [1.5e-2], 0.0) == "PASS"
    assert status("bfloat16", [3e-2], 0.0) == "FAIL"
    assert status("float32", [1e-7], 2e-5) == "FAIL"  # forward differs from F.conv2d
    assert status("float16", [float("nan")], 0.0) == "FAIL"


def test_checker_passes_the_filter_and_catches_a_wrong_gradient(monkeypatch):
    case = gpu_correctness.ConvCase("3x3 s2", 2, 3, 4, (9, 9), stride=2, rs=(2,))
    good = gpu_correctness.check_case(case, "reference", "cpu", ["float32", "bfloat16"])
    assert len(good) == 4 and {r.status for r in good} == {"PASS"}

    def paper_scale(*args, stride_correction=True, **kwargs):  # the wrong convention: 4x too large
        return filtered_conv2d(*args, stride_correction=not stride_correction, **kwargs)

    monkeypatch.setattr(gpu_correctness, "filtered_conv2d", paper_scale)
    bad = gpu_correctness.check_case(case, "reference", "cpu", ["float32"])
    assert {r.status for r in bad} == {"FAIL"}
    assert all(r.grad_err["g_w"] > 0.5 and r.grad_err["g_b"] < 1e-6 for r in bad)  # the bias stays exact
    summary = gpu_correctness.summarize([gpu_correctness.asdict(r) for r in good + bad])
    assert (summary["passed"], summary["failed"]) == (4, 2)
    assert summary["failures"][0].startswith("reference 3x3 s2 r=2")


def test_largest_batch_doubles_then_bisects():
    tried = []

    def fits(b):
        tried.append(b)
        return b <= 100

    found = gpu_models.largest_batch(fits, start=8, cap=1024, seconds=60)
    assert found["capped"] is None and 94 <= found["batch"] <= 100  # within 1/16 of the answer
    assert tried[:5] == [8, 16, 32, 64, 128]
    assert max(tried) <= 1024 and len(tried) <= 10
    assert gpu_models.largest_batch(lambda b: True, start=8, cap=50, seconds=60) == {
        "batch": 50, "tries": [(8, True), (16, True), (32, True), (50, True)], "capped": "cap"}
    assert gpu_models.largest_batch(lambda b: False, start=8, cap=50, seconds=60)["batch"] == 0
    assert gpu_models.largest_batch(lambda b: True, start=8, cap=10**6, seconds=0)["capped"] == "time"


def _results() -> dict:
    layer = dict(kind="paper", r=2, batch=32, dtype="float32", fwd_vanilla_ms=1.0, fwd_filtered_ms=1.05,
                 fwd_overhead=1.05, bwd_vanilla_ms=2.0)
    layers = [dict(layer, name="3x3 a", bwd_filtered_ms=0.25, bwd_speedup=8.0),
              dict(layer, name="3x3 b", bwd_filtered_ms=1.0, bwd_speedup=2.0),
              dict(layer, name="dw c", kind="depthwise", bwd_filtered_ms=4.0, bwd_speedup=0.5),
              dict(layer, name="3x3 a", dtype="bfloat16", bwd_filtered_ms=0.5, bwd_speedup=4.0)]
    model = {"model": "smp UPerNet-resnet18", "depth": 10, "size": 512, "batch": 8, "r": 2,
             "base_mib_vanilla": 120.0, "base_mib_filter": 220.0, "base_mib_lean": 200.0, "kept_mib_vanilla": 1000.0, "kept_mib_filter": 700.0, "kept_mib_lean": 250.0,
             "peak_mib_vanilla": 2400.0, "peak_mib_filter": 2900.0, "peak_mib_lean": 1200.0,
             "peak_forward_mib_vanilla": 2000.0, "peak_backward_mib_vanilla": 2400.0,
             "peak_forward_mib_lean": 1200.0, "peak_backward_mib_lean": 900.0,
             "graph_kept_mib_vanilla": 990.0, "graph_kept_mib_filter": 690.0, "graph_kept_mib_lean": 240.0,
             "step_ms_vanilla": 40.0, "step_ms_filter": 42.0, "step_ms_lean": 38.0}
    failed = {"tier": "large", "case": "depthwise 960x7x7", "r": 4, "stride_correction": True, "dtype": "bfloat16",
              "layout": "channels_last", "forward_err": 0.0, "grad_err": {"g_x": 0.5, "g_w": 1e-3}, "status": "FAIL",
              "logs": ["lightning_gf.cuda: fell back to the plain path"]}
    passed = dict(failed, status="PASS", layout="contiguous", grad_err={"g_x": 1e-3, "g_w": 1e-3}, logs=[])
    return {
        "command": "PYTHONPATH=. python3 -m benchmarks.gpu --out $OUT", "smoke": False, "elapsed_s": 200.0,
        "env": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_mib": 81559.0, "capability": "9.0", "torch": "2.11.0",
                "cuda": "12.8", "cudnn": 91002, "triton": "3.6.0", "date": "2026-01-01 00:00",
                "cudnn_benchmark_in_timings": True},
        "correctness": {"cases": [failed, passed], "summary": gpu_correctness.summarize([failed, passed]),
                        "tolerance": gpu_correctness.TOLERANCE, "reference_cases": [], "large_cases": [{}]},
        "layers": layers, "models": [], "segmentation": [model],
        "layers_graphed": [dict(row, graphed=True, bwd_speedup=row["bwd_speedup"] * 2) for row in layers],
        "graphs": [{"model": "timm resnet18", "batch": 64, "step_ms_eager_vanilla": 30.0, "step_ms_eager_lean": 33.0,
                    "step_ms_graph_vanilla": 20.0, "step_ms_graph_lean": 15.0},
                   {"model": "timm efficientnet_b0", "batch": 64, "step_ms_eager_vanilla": 30.0,
                    "step_ms_eager_lean": 33.0, "step_ms_graph_vanilla": 20.0, "step_ms_graph_lean": None,
                    "graph_error_lean": "RuntimeError: capture failed"}],
        "budget": [{"model": "timm resnet18", "depth": 4, "size": 224, "budget_mib": 8192, "batch_vanilla": 600,
                    "batch_lean": 660, "capped_vanilla": None, "capped_lean": "time"}],
        "skipped": ["graphs timm mobilenetv2_100: time budget"], "errors": [],
        "merged": [{"sections": ["budget"], "command": "python3 -m benchmarks.gpu --sections budget",
                    "date": "2026-01-01 00:05", "commit": "abc1234"}],
    }


def _table_row(page: str, starts: str) -> list[str]:
    line = next(line for line in page.splitlines() if line.startswith(starts))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_gpu_page_tables(tmp_path):
    source = tmp_path / "out" / "gpu-results.json"
    source.parent.mkdir()
    source.write_text(json.dumps(_results()))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "benchmarks.md").write_text(f"# Benchmarks\n\nintro\n\n{gpu_docs.NO_RESULTS_LINE}\n\n## Per layer\n")
    page = gpu_docs.write_from_json(source, docs).read_text()

    assert json.loads((docs / "gpu-results.json").read_text()) == _results()  # copied next to the page
    assert "NVIDIA H100 80GB HBM3" in page and "Triton 3.6.0" in page and "--out $OUT" in page
    assert "Sections budget from an earlier run on the same machine: `python3 -m benchmarks.gpu --sections budget`" in page
    assert "**1 passed**" in page and "**1 failed**" in page
    assert "- large depthwise 960x7x7 r=4 sc=True bfloat16 channels_last" in page
    assert "fell back to the plain path" in page
    # per layer: geometric mean over the paper suite (8x and 2x), the slowest layer of any kind
    assert "r=2: paper suite backward **4.00x** faster" in page
    assert "slowest layer of any kind 0.50x (dw c; none slower than cuDNN: **not met**)" in page
    assert "forward time ratio 1.05x" in page
    assert "### bfloat16, batch 32" in page
    assert _table_row(page, "| dw c |")[-1] == "**0.50x**"
    model = _table_row(page, "| smp UPerNet-resnet18 |")
    # peaks above what each variant held before its step: 2280 / 2680 / 1000
    assert model[4:8] == ["1000 / 700 / 250", "**-75%**", "2280 / 2680 / 1000", "**-56%**"]
    assert model[9] == "40.0 / 42.0 / 38.0"
    assert "r=2: paper suite backward **8.00x** faster" in page  # the graphed table (GPU time alone)
    assert "### CUDA graphs, float32, batch 32" in page
    assert _table_row(page, "| smp UPerNet-resnet18 | 1880") == [
        "smp UPerNet-resnet18", "1880 / 1000", "2280 / 700", "backward / forward"]
    assert _table_row(page, "| timm resnet18 | 64 |")[-1] == "0.75x"  # graphed lean vs vanilla
    assert _table_row(page, "| timm efficientnet_b0 |")[-2] == "20.0 / n/a"
    assert "capture failed: `RuntimeError: capture failed`" in page
    assert _table_row(page, "| timm resnet18 | 4 |")[4:] == ["600", "660 (search stopped: time)", "1.10x"]
    assert "- graphs timm mobilenetv2_100: time budget" in page
    # benchmarks.md now links the page, once
    text = (docs / "benchmarks.md").read_text()
    assert gpu_docs.NO_RESULTS_LINE not in text and text.count("](benchmarks-gpu.md)") == 1
    gpu_docs.write_from_json(docs / "gpu-results.json", docs)
    assert (docs / "benchmarks.md").read_text() == text


def test_command_line_checks():
    with pytest.raises(SystemExit):
        gpu.parse_args(["--smoke"])  # no --out
    with pytest.raises(SystemExit):
        gpu.parse_args(["--out", "x", "--sections", "correctness,speed"])
    assert gpu._command(["--out", "/tmp/abc", "--smoke"]) == "PYTHONPATH=. python3 -m benchmarks.gpu --out $OUT --smoke"
    if not torch.cuda.is_available():
        assert gpu.main(["--out", "unused"]) == 2  # asks for --device cpu instead of crashing


def test_smoke_run_on_cpu(tmp_path):
    """The whole script at tiny sizes (15-25 s on one core): what the device run does, minus CUDA."""
    assert gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu-results.json").read_text())
    assert data["sections_done"] == list(gpu.SECTIONS) and not data["errors"]
    assert data["correctness"]["summary"]["failed"] == 0 and data["correctness"]["summary"]["total"] > 0
    assert {(row["dtype"], row["r"]) for row in data["layers"]} == {(d, r) for d in ("float32", "bfloat16") for r in (2, 4)}
    assert [row["model"] for row in data["models"]] == list(gpu.TIMM)
    assert all(math.isfinite(row[f"step_ms_{v}"]) for row in data["models"] for v in gpu_models.VARIANTS)
    assert len(data["budget"]) == 2 and all(row["batch_lean"] == 2 for row in data["budget"])
    page = gpu_docs.render(data)
    assert "Smoke run" in page and "| timm resnet18 |" in page


class _CudaName(str):
    """A device name the benchmark's CUDA branches take, while tensors stay on the CPU."""

    def startswith(self, prefix, *args):
        return prefix == "cuda" or str.startswith(self, prefix, *args)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory, event and graph functions faked; returns what they recorded."""
    import contextlib
    import time
    import types

    class Event:
        def __init__(self, enable_timing=False):
            self.t = 0.0

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    # forward's peak, then backward's (read once each, after a reset)
    state = {"allocated": iter([100 * 2**20, 130 * 2**20]), "peaks": iter([180 * 2**20, 150 * 2**20]),
             "fractions": [], "replays": 0}

    def replay():
        state["replays"] += 1

    class Stream:
        def wait_stream(self, other):
            pass

    def set_fraction(fraction, device=None):
        if not isinstance(device, int):  # as torch does for torch.device("cuda"), which has no index
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        state["fractions"].append(fraction)

    fakes = dict(
        Event=Event, synchronize=lambda *a: None, empty_cache=lambda: None, reset_peak_memory_stats=lambda *a: None,
        memory_allocated=lambda *a: next(state["allocated"]), max_memory_allocated=lambda *a: next(state["peaks"]),
        get_device_properties=lambda d: types.SimpleNamespace(total_memory=80 * 2**30),
        set_per_process_memory_fraction=set_fraction, current_device=lambda: 0,
        Stream=Stream, current_stream=Stream, stream=lambda s: contextlib.nullcontext(),
        graph=lambda g: contextlib.nullcontext(), CUDAGraph=lambda: types.SimpleNamespace(replay=replay),
    )
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    return state


def _tiny_spec():
    from benchmarks.models import ModelSpec
    from tests.helpers.models import TinyCNN

    return ModelSpec("tiny", TinyCNN, depth=2, size=16, batch=2)


def test_cuda_branches_with_torch_cuda_faked(fake_cuda, monkeypatch):
    device = _CudaName("cpu")
    trainee = gpu_models.build(_tiny_spec(), 2, 16, variants=("lean",))["lean"].to(device)
    memory = gpu_models.measure_memory(trainee, torch.randn(2, 3, 16, 16), device)
    assert (memory["base_mib"], memory["kept_mib"], memory["peak_mib"]) == (100, 30, 180)
    assert (memory["peak_forward_mib"], memory["peak_backward_mib"]) == (180, 150)
    assert torch.backends.cudnn.benchmark is False  # restored: the autotuner is off only while measuring

    real_step = gpu_models.Trainee.step

    def step_out_of_memory_above_5(self, x):
        real_step(self, x)
        if x.shape[0] > 5:
            raise torch.cuda.OutOfMemoryError("fake")

    monkeypatch.setattr(gpu_models.Trainee, "step", step_out_of_memory_above_5)
    row = gpu_models.batch_in_budget(_tiny_spec(), 2, 16, device, 8192, start=1, cap=64, seconds=60,
                                     report=lambda line: None)
    assert (row["batch_vanilla"], row["batch_lean"]) == (5, 5)
    assert fake_cuda["fractions"] == [0.1, 1.0, 0.1, 1.0]  # 8 GiB of 80, then the whole device again
    monkeypatch.setattr(gpu_models.Trainee, "step", real_step)

    row = gpu_models.bench_graphed(_tiny_spec(), 2, 2, 16, device, repeats=2, report=lambda line: None)
    assert fake_cuda["replays"] > 0 and row["step_ms_graph_lean"] is not None and row["step_ms_eager_vanilla"] > 0


def test_a_failed_measurement_is_recorded_and_the_run_goes_on(tmp_path, capsys):
    results = gpu.Results(tmp_path, {"errors": []})
    assert results.attempt("fine", lambda: {"row": 1}) == {"row": 1}
    assert results.attempt("layer x r=2", lambda: 1 / 0, trace=True) is None
    assert results.data["errors"] == ["layer x r=2: ZeroDivisionError: division by zero"]
    assert "ERROR layer x r=2: ZeroDivisionError" in capsys.readouterr().out
