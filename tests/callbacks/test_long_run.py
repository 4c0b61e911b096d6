"""300 training steps with the callback: memory kept per step does not grow, every logged number is finite."""

from __future__ import annotations

import gc
import math
import os

import pytorch_lightning as pl
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_gf import GradientFilterCallback
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.models import TinyCNN

STEPS = 300
PROBES = (100, 200, 300)  # after warm-up


def _live_objects() -> dict[str, int]:
    """Tensors Python can reach (count, storage-deduplicated bytes) and lightning_gf objects."""
    gc.collect()
    storages = {}
    tensors = ours = 0
    for obj in gc.get_objects():
        if isinstance(obj, FakeTensor):  # left by torch.compile tests in the same session
            continue
        if isinstance(obj, torch.Tensor):
            tensors += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif str(getattr(type(obj), "__module__", "")).startswith("lightning_gf"):
            ours += 1
    return {"tensors": tensors, "tensor_bytes": sum(storages.values()), "lightning_gf_objects": ours}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryProbe(pl.Callback):
    def __init__(self) -> None:
        self.samples: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in PROBES:
            self.samples[step] = {**_live_objects(), "rss_mib": _rss_mib()}


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyCNN()
        self.example_input_array = torch.zeros(1, 3, 16, 16)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.model(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def forward(self, x):
        return self.model(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(40, 3, 16, 16, generator=g), torch.arange(40) % 3)
        return DataLoader(data, batch_size=4, shuffle=True)


def test_300_steps_constant_memory_and_finite_logs(tmp_path):
    logger, probe = MemoryLogger(), MemoryProbe()
    pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
        callbacks=[GradientFilterCallback(r=2, depth=2), probe], default_root_dir=tmp_path,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(Lit())

    gf_rows = [m for _, m in logger.rows if "gf/activation_mb" in m]
    assert len(gf_rows) == STEPS
    values = [v for _, m in logger.rows for v in m.values()]
    assert values and all(math.isfinite(v) for v in values)
    # what the filtered layers keep is the same every step
    assert len({m["gf/activation_mb"] for m in gf_rows}) == 1 and gf_rows[0]["gf/activation_mb"] > 0

    s = probe.samples
    print("memory probes:", s)
    first, last = s[PROBES[0]], s[PROBES[-1]]
    for key in ("tensors", "tensor_bytes", "lightning_gf_objects"):
        assert last[key] == first[key], key  # nothing accumulates, exactly
    assert last["rss_mib"] - first["rss_mib"] < 8  # the whole process (allocator noise allowed)
