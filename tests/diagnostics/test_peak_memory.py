"""``gf/peak_mb``: the callback logs each training step's CUDA peak (torch.cuda faked here)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from lightning_gf import GradientFilterCallback
from lightning_gf.diagnostics import peak_memory
from tests.helpers.lightning import lit_tiny_class, trainer_for
from tests.helpers.memory_logger import MemoryLogger

MIB = 2**20


def _fit(tmp_path) -> list[float]:
    logger = MemoryLogger()
    model = lit_tiny_class(pl)()
    trainer_for(pl, tmp_path, [GradientFilterCallback(r=2, depth=2)], logger=logger).fit(model)
    return [row["gf/peak_mb"] for _, row in logger.rows if "gf/peak_mb" in row]


def test_peak_is_logged_per_step_in_mib_after_a_reset(tmp_path, monkeypatch):
    events: list[tuple[str, torch.device]] = []

    def reset(device=None):
        events.append(("reset", device))

    def max_allocated(device=None):
        events.append(("read", device))
        resets = sum(1 for name, _ in events if name == "reset")
        return int((3 * resets + 0.5) * MIB)  # a different peak after every reset

    monkeypatch.setattr(peak_memory, "on_cuda", lambda device: device.type == "cpu")  # the fit's device
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", max_allocated)

    assert _fit(tmp_path) == [3.5, 6.5, 9.5, 12.5]  # 4 steps, MiB, one reset before each read
    assert [name for name, _ in events] == ["reset", "read"] * 4
    assert {device for _, device in events} == {torch.device("cpu")}


def test_no_peak_metric_off_cuda(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda memory functions called for a CPU module")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", forbidden)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", forbidden)
    assert _fit(tmp_path) == []


def test_on_cuda_needs_a_cuda_device_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert peak_memory.on_cuda(torch.device("cuda", 0))
    assert not peak_memory.on_cuda(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not peak_memory.on_cuda(torch.device("cuda", 0))
