"""Lightning pieces shared by the callback tests: both namespaces, a tiny LightningModule, a Trainer."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers.models import TinyCNN

# each namespace with the public path of its callback
NAMESPACES = {
    "pytorch_lightning": ("pytorch_lightning", "lightning_gf.callback"),
    "lightning.pytorch": ("lightning.pytorch", "lightning_gf.lightning"),
}


class IndexedImages(Dataset):
    """Random images whose label is their index modulo 3, and which remember their index."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], torch.tensor(i % 3), torch.tensor(i)


def namespace_of(name):
    pl_name, cb_module = NAMESPACES[name]
    pl = importlib.import_module(pl_name)
    return pl, importlib.import_module(cb_module).GradientFilterCallback


def lit_tiny_class(pl):
    class LitTiny(pl.LightningModule):
        def __init__(self, with_example: bool = True) -> None:
            super().__init__()
            self.model = TinyCNN()
            self.seen: list[int] = []
            if with_example:
                self.example_input_array = torch.zeros(1, 3, 16, 16)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.seen.extend(idx.tolist())
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("val_loss", nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(IndexedImages(), batch_size=4, shuffle=True)

        def val_dataloader(self):
            return DataLoader(IndexedImages(8), batch_size=4)

    return LitTiny


def trainer_for(pl, tmp_path, callbacks, **kwargs):
    return pl.Trainer(
        max_steps=4, accelerator="cpu", devices=1, callbacks=callbacks, default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        limit_val_batches=1, val_check_interval=2, **kwargs,
    )
