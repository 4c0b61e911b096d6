"""A 2-process CPU DDP fit (gloo) with GradientFilterCallback, used by tests/callbacks/test_ddp.py.

Standalone: ``PYTHONPATH=. python tests/helpers/ddp_fit.py OUT_DIR`` runs ``strategy="ddp"``
(Lightning starts the second process itself). Each rank writes ``OUT_DIR/rank{k}.pt``:
its final weights, the filtered layers, the parameters frozen during the fit, the
sample indices it trained on and the steps it ran.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_gf import GradientFilterCallback
from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.models import TinyCNN


class Indexed(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], torch.tensor(i % 3), torch.tensor(i)


class LitDDP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyCNN()
        self.seen: list[int] = []
        self.filtered: set[str] = set()
        self.steps = 0
        self.frozen: set[str] = set()

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen += idx.tolist()
        self.steps += 1
        self.filtered |= {n for n, m in self.named_modules() if is_swapped(m) and isinstance(m, nn.Conv2d)}
        self.frozen |= {n for n, p in self.named_parameters() if not p.requires_grad}
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(Indexed(), batch_size=4, shuffle=True)


class SaveRank(pl.Callback):
    """Each rank writes what it ended with (the main process of ddp_fork does not train)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "state_dict": pl_module.state_dict(),
                "filtered": sorted(pl_module.filtered),
                "frozen_during_fit": sorted(pl_module.frozen),
                "seen": pl_module.seen,
                "steps": pl_module.steps,
                "world_size": trainer.world_size,
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def fit(out: Path, strategy: str = "ddp") -> None:
    pl.seed_everything(0)
    model = LitDDP()
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=2, max_steps=4,
        callbacks=[GradientFilterCallback(r=2, depth=2), SaveRank(out)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model)


if __name__ == "__main__":
    fit(Path(sys.argv[1]))
