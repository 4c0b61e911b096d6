"""Resuming a filtered fit from a mid-training checkpoint continues like the uninterrupted run."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_gf import GradientFilterCallback
from tests.helpers.models import TinyCNN

# docs/reliability.md states this: the resumed losses equal the uninterrupted ones to
LOSS_ATOL = 1e-6


class Images(Dataset):
    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on the epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class Lit(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyCNN()
        self.example_input_array = torch.zeros(1, 3, 16, 16)
        self.losses: dict[int, float] = {}

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.losses[self.global_step] = loss.item()
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        data = Images()
        return DataLoader(data, batch_size=4, sampler=EpochShuffle(len(data)))


def _trainer(tmp_path, cb, **kwargs):
    return pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, callbacks=[cb, *kwargs.pop("callbacks", [])],
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """18 steps (3 epochs of 6), with a checkpoint after each epoch.

    Checkpoints inside an epoch restore the model, optimizer and scheduler the same way, but
    Lightning replays an interrupted epoch from its first batch for a plain DataLoader, so
    only epoch-end checkpoints can continue batch for batch (with or without the filter).
    """
    root = tmp_path_factory.mktemp("resume")
    module = Lit()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root / "epoch", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    _trainer(root, GradientFilterCallback(r=2, depth=2), callbacks=[ckpt]).fit(module)
    assert len(module.losses) == 18
    return root, module.losses


@pytest.mark.parametrize("ckpt,first_step", [("epoch/epoch=0.ckpt", 6), ("epoch/epoch=1.ckpt", 12)])
def test_resume_continues_like_the_uninterrupted_run(uninterrupted, tmp_path, ckpt, first_step):
    root, losses = uninterrupted
    module = Lit(seed=123)  # other initial weights: everything must come from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # same configuration: no configuration warning
        warnings.filterwarnings("ignore", message=r"(?!GradientFilterCallback)")
        _trainer(tmp_path, GradientFilterCallback(r=2, depth=2)).fit(module, ckpt_path=root / ckpt)
    assert sorted(module.losses) == list(range(first_step, 18))
    resumed = torch.tensor([module.losses[s] for s in range(first_step, 18)])
    expected = torch.tensor([losses[s] for s in range(first_step, 18)])
    torch.testing.assert_close(resumed, expected, rtol=0, atol=LOSS_ATOL)


def test_resume_with_another_configuration_warns_and_keeps_the_new_one(uninterrupted, tmp_path):
    root, _ = uninterrupted
    module = Lit()
    cb = GradientFilterCallback(r=4, depth=2)
    seen_r = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, *args):
            seen_r.extend(layer.r for layer in cb.handle.layers)

    with pytest.warns(UserWarning, match=r"different configuration \(r: checkpoint 2 -> now 4\)"):
        _trainer(tmp_path, cb, callbacks=[Probe()]).fit(module, ckpt_path=root / "epoch/epoch=1.ckpt")
    assert seen_r and set(seen_r) == {4}


def test_checkpoint_holds_the_configuration(uninterrupted):
    root, _ = uninterrupted
    state = torch.load(root / "epoch/epoch=0.ckpt", weights_only=False)
    (cb_state,) = [v for k, v in state["callbacks"].items() if "GradientFilterCallback" in k]
    fresh = GradientFilterCallback()
    assert cb_state == GradientFilterCallback(r=2, depth=2).config()
    with pytest.warns(UserWarning, match=r"depth: checkpoint 2 -> now 3"):
        fresh.load_state_dict(cb_state)
