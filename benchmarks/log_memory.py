"""What the callback's measured memory figures cost per training step (``log_memory``).

    python -m benchmarks.log_memory

Times a timm resnet18 fine-tune (depth 4, r = 2, 64 px, batch 16) with the callback's
``log_memory`` on and off, in alternating fits within one process, and prints the median
step time of each (the first 5 steps of a fit, which include the once-per-shape plain
backprop measurement, are left out).
"""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gf import GradientFilterCallback

STEPS, WARMUP, ROUNDS = 40, 5, 3


class _Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("resnet18", pretrained=False, num_classes=10)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


class _Timer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def _median_step(log_memory: bool, data: TensorDataset) -> float:
    timer = _Timer()  # last: its batch-end hook runs after the callback's
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradientFilterCallback(r=2, depth=4, log_memory=log_memory), timer])
    trainer.fit(_Lit(), DataLoader(data, batch_size=16))
    return statistics.median(timer.times[WARMUP:])


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16 * STEPS, 3, 64, 64, generator=g), torch.randint(0, 10, (16 * STEPS,), generator=g))
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(ROUNDS):
        for flag in (False, True):
            times[flag].append(_median_step(flag, data))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"median step, log_memory=False: {off * 1e3:.2f} ms; log_memory=True: {on * 1e3:.2f} ms; "
          f"ratio {on / off:.3f} (torch {torch.__version__}, 1 thread)")


if __name__ == "__main__":
    main()
