"""The callback next to Lightning's own callbacks and loggers (pytorch_lightning namespace)."""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from pytorch_lightning import callbacks as plc
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gf import GradientFilterCallback
from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.models import TinyCNN

X = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(16) % 3
GF_KEYS = {"gf/activation_mb", "gf/activation_mb_vanilla", "gf/memory_saved_mb", "gf/backward_gflops_saved"}


class Lit(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyCNN()
        self.example_input_array = torch.zeros(1, 3, 16, 16)
        self.gf_kept: list[float] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.gf_kept.append(float(self.trainer.callback_metrics.get("gf/activation_mb", -1)))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)

    def train_dataloader(self):
        return DataLoader(TensorDataset(X, Y), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(X[:8], Y[:8]), batch_size=4)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


def _trainer(tmp_path, callbacks, **kwargs):
    kwargs = {"max_epochs": 2, "logger": False, **kwargs}
    return pl.Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, **kwargs,
    )


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def _computes_with_its_own_weights(copy_module: nn.Module, original: nn.Module) -> None:
    """A copy made while the filter was installed uses its own parameters, forward and backward."""
    fresh = TinyCNN()
    fresh.load_state_dict(copy_module.state_dict())
    with torch.no_grad():
        for p in original.parameters():
            p.add_(1.0)  # the original now differs
    copy_module.eval()
    fresh.eval()
    torch.testing.assert_close(copy_module(X[:2]), fresh(X[:2]))
    assert not torch.allclose(copy_module(X[:2]), original.eval()(X[:2]))
    for p in list(copy_module.parameters()) + list(original.parameters()):
        p.grad = None
    copy_module.train()(X[:2]).sum().backward()
    assert any(p.grad is not None for p in copy_module.parameters())
    assert all(p.grad is None for p in original.parameters())


def test_stochastic_weight_averaging(tmp_path):
    module = Lit()
    for bn in module.modules():  # pretrained-like statistics, not the initial zeros/ones
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    bn_before = _bn_stats(module)
    swa = plc.StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1)
    _trainer(tmp_path, [GradientFilterCallback(r=2, depth=2), swa], max_epochs=3).fit(module)
    # the SWA average was copied into the model, and the frozen BN statistics survived its BN-update epoch
    for p_avg, p in zip(swa._average_model.parameters(), module.parameters()):
        assert torch.equal(p_avg, p)
    for name, value in _bn_stats(module).items():
        assert torch.equal(value, bn_before[name]), name
    assert min(module.gf_kept) > 0
    assert not any(is_swapped(m) for m in module.modules())
    _computes_with_its_own_weights(swa._average_model.model, module.model)


def test_ema_weight_averaging(tmp_path):
    module = Lit()
    ema = plc.EMAWeightAveraging(decay=0.5)
    _trainer(tmp_path, [GradientFilterCallback(r=2, depth=2), ema]).fit(module)
    averaged = ema._average_model.module
    assert any(is_swapped(m) for m in averaged.modules())  # copied after the filter was installed
    for p_avg, p in zip(averaged.parameters(), module.parameters()):
        assert torch.equal(p_avg, p)  # copied into the model at the end of training
    _computes_with_its_own_weights(averaged.model, module.model)


def test_model_pruning(tmp_path):
    module = Lit()
    stem_before = module.model.stem[0].weight.detach().clone()
    pruning = plc.ModelPruning("l1_unstructured", amount=0.5, use_global_unstructured=False)
    _trainer(tmp_path, [GradientFilterCallback(r=2, depth=2), pruning]).fit(module)
    last = module.model.last[0].weight
    assert (last == 0).float().mean() >= 0.5  # pruned, made permanent
    assert min(module.gf_kept) > 0  # filtered every step
    stem = module.model.stem[0].weight
    kept = stem != 0
    assert torch.equal(stem[kept], stem_before[kept])  # frozen: pruned, never trained
    assert not any(is_swapped(m) for m in module.modules())


class LitBackbone(Lit):
    def __init__(self) -> None:
        super().__init__()
        m = self.model
        self.backbone = nn.Sequential(m.stem, m.block, m.last)
        self.head = m.head
        del self.model

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


def test_backbone_finetuning(tmp_path):
    module = LitBackbone()
    stem_before = module.backbone[0][0].weight.detach().clone()
    gf = GradientFilterCallback(r=2, depth=2)
    layers = []

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            layers.append([layer.name for layer in gf.handle.layers])

    finetune = plc.BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    _trainer(tmp_path, [gf, finetune, Probe()]).fit(module)
    assert layers == [["backbone.1.0", "backbone.2.0"]] * 2
    # epoch 0: the whole backbone is frozen by BackboneFinetuning, so only the head keeps its input;
    # epoch 1: BackboneFinetuning unfreezes it (over freeze=True), and the backbone keeps tensors too
    assert len(set(module.gf_kept[:4])) == 1 and module.gf_kept[0] > 0
    assert min(module.gf_kept[4:]) > module.gf_kept[0]
    assert not torch.equal(module.backbone[0][0].weight, stem_before)  # the stem trained in epoch 1


def test_lr_monitor_csv_and_tensorboard_loggers_show_gf_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv = pl.loggers.CSVLogger(tmp_path, name="csv")
    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(tmp_path, [GradientFilterCallback(r=2, depth=2), plc.LearningRateMonitor("step")],
                       logger=[csv, tb], max_epochs=1)
    trainer.fit(Lit())
    import csv as csv_module

    with open(csv.log_dir + "/metrics.csv") as f:
        rows = list(csv_module.DictReader(f))
    columns = set(rows[0])
    assert GF_KEYS <= columns and "lr-SGD" in columns
    saved = [float(r["gf/memory_saved_mb"]) for r in rows if r["gf/memory_saved_mb"]]
    assert len(saved) == 4 and min(saved) > 0
    events = EventAccumulator(tb.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert GF_KEYS <= tags and "lr-SGD" in tags
    assert len(events.Scalars("gf/activation_mb")) == 4


def test_validation_during_fit_and_other_stages_are_unaffected(tmp_path):
    module = Lit()
    plain = copy.deepcopy(module)
    val_checks = []

    class CompareWithPlain(pl.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if trainer.state.fn != "fit":
                return
            assert any(is_swapped(m) for m in pl_module.modules())  # installed during fit's validation
            plain.load_state_dict(pl_module.state_dict())
            plain.eval()
            with torch.no_grad():
                val_checks.append(torch.equal(pl_module(batch[0]), plain(batch[0])))

    gf = GradientFilterCallback(r=2, depth=2)
    trainer = _trainer(tmp_path, [gf, CompareWithPlain()], max_epochs=1)
    trainer.fit(module)
    assert val_checks and all(val_checks)
    plain.load_state_dict(module.state_dict())
    other = _trainer(tmp_path, [], max_epochs=1)
    assert trainer.validate(module, verbose=False) == other.validate(plain, verbose=False)
    assert trainer.test(module, verbose=False) == other.test(plain, verbose=False)
    for a, b in zip(trainer.predict(module), other.predict(plain)):
        assert torch.equal(a, b)
    assert gf.handle is None and not any(is_swapped(m) for m in module.modules())
