"""What the filter keeps is what autograd keeps: channels_last inputs, and the callback's logged figures.

Every figure here is measured in the test itself with its own ``saved_tensors_hooks``
(one count per storage, parameters and buffers left out), never with the library's meter.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gf import GradientFilterCallback, apply_gradient_filter
from tests.helpers.memory_logger import MemoryLogger

MIB = 2**20


def kept_by(fn, model: nn.Module):
    """``fn()`` and the bytes of the distinct storages autograd saved while it ran."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _two_convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))


@pytest.mark.parametrize("filtered", [False, True])
def test_channels_last_input_keeps_what_an_nchw_one_keeps(backend, filtered):
    # The pooling fallback ran F.pad / avg_pool2d on a channels_last tensor that needed grad:
    # autograd recorded them and kept the full input beside the patch sums.
    x = torch.randn(2, 8, 15, 15)
    kept = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        net = _two_convs()
        if filtered:
            apply_gradient_filter(net, r=2, depth=2, example_input=x[:1], freeze=False)
        xi = x.contiguous(memory_format=layout).requires_grad_()
        out, kept[layout] = kept_by(lambda: net(xi), net)
        out.sum().backward()
    assert kept[torch.channels_last] == kept[torch.contiguous_format]
    if filtered:  # each conv keeps the patch sums of its input (8 x 8 patches of a 15 x 15 map), nothing else
        assert kept[torch.contiguous_format] == 2 * (2 * 8 * 8 * 8 * 4)


def test_channels_last_timm_resnet_keeps_what_nchw_keeps_and_less_than_plain():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=4)
    handle = apply_gradient_filter(net, r=2, depth=4, example_input=torch.zeros(1, 3, 64, 64))
    net.train()
    x = torch.randn(2, 3, 64, 64)
    kept = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=layout)
        _, kept[layout] = kept_by(lambda: net(xi), net)
        with handle.plain():
            _, kept[layout, "plain"] = kept_by(lambda: net(xi), net)
    assert kept[torch.channels_last] == kept[torch.contiguous_format]
    assert kept[torch.channels_last] < 0.6 * kept[torch.channels_last, "plain"]


class OddNet(nn.Module):
    """Odd-sized maps, a strided conv, a depthwise conv and a pointwise conv; optionally channels_last inside."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU6())
        self.pw = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.pw(self.dw(self.down(self.stem(x))))
        return self.head(x.mean((2, 3)))


class LitOdd(pl.LightningModule):
    def __init__(self, channels_last: bool, data: TensorDataset) -> None:
        super().__init__()
        self.net = OddNet(channels_last)
        self.data = data

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=5)  # 5, 5, 3: sizes measured whole and extended


@pytest.mark.parametrize("channels_last,precision", [(False, "32-true"), (True, "32-true"), (False, "bf16-mixed")])
def test_logged_memory_is_what_each_step_keeps(channels_last, precision, tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(13, 3, 15, 15, generator=g), torch.randint(0, 3, (13,), generator=g))
    torch.manual_seed(0)
    module = LitOdd(channels_last, data)
    twin = copy.deepcopy(module)  # measured by hand below, with the same options
    logger = MemoryLogger()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         precision=precision,
                         callbacks=[GradientFilterCallback(r=3, depth=3)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module)
    rows = [m for _, m in logger.rows if "gf/activation_mb" in m]
    assert len(rows) == 3

    handle = apply_gradient_filter(twin, r=3, depth=3, example_input=data.tensors[0][:1])
    assert [layer.name for layer in handle.layers] == ["net.down.0", "net.dw.0", "net.pw"]
    twin.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for row, batch in zip(rows, DataLoader(data, batch_size=5)):
        with autocast:
            loss, filtered = kept_by(lambda: twin.training_step(batch, 0), twin)
            with handle.plain():
                _, plain = kept_by(lambda: twin.training_step(batch, 0), twin)
        assert plain > filtered > 0
        assert row["gf/activation_mb"] == pytest.approx(filtered / MIB, rel=1e-6)
        assert row["gf/activation_mb_vanilla"] == pytest.approx(plain / MIB, rel=1e-6)
        assert row["gf/memory_saved_mb"] == pytest.approx((plain - filtered) / MIB, rel=1e-6)


class DictBatchModule(pl.LightningModule):
    """A LightningModule whose forward takes the batch dict (as some public tutorials write it)."""

    def __init__(self, forward_takes_batch: bool = True) -> None:
        super().__init__()
        self.forward_takes_batch = forward_takes_batch
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 2)

    def forward(self, batch, *required):
        if not self.forward_takes_batch and not required:
            raise TypeError("forward() missing 1 required positional argument: 'scale'")
        return self.head(self.body(batch["image"]).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch, 1.0), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        images, labels = torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 2, (8,), generator=g)
        return DataLoader([{"image": i, "label": l} for i, l in zip(images, labels)], batch_size=4)


def _fit(module, tmp_path, **trainer_kwargs):
    logger = MemoryLogger()
    cb = GradientFilterCallback(r=2, depth=2)
    pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, callbacks=[cb],
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path, **trainer_kwargs).fit(module)
    return [m for _, m in logger.rows if "gf/activation_mb" in m]


def test_a_forward_that_takes_the_batch_dict_gets_the_batch(tmp_path):
    # the callback used to pass batch["image"][:1], and the forward failed with a bare IndexError
    rows = _fit(DictBatchModule(), tmp_path)
    assert len(rows) == 2 and rows[0]["gf/activation_mb_vanilla"] > rows[0]["gf/activation_mb"] > 0


def test_an_example_input_that_cannot_be_derived_says_example_input_array_fixes_it(tmp_path):
    with pytest.raises(ValueError, match=r"could not derive an example input from the first training batch: the "
                       r"model's forward failed on a tensor of shape \(1, 3, 12, 12\) \(TypeError: .*\); the "
                       r"model's forward failed on a tuple of 1 positional arguments .*example_input_array"):
        _fit(DictBatchModule(forward_takes_batch=False), tmp_path)


def test_with_example_input_array_and_an_unusable_batch_logs_what_it_measures_and_warns(tmp_path):
    module = DictBatchModule(forward_takes_batch=False)
    module.example_input_array = ({"image": torch.zeros(1, 3, 12, 12)}, 1.0)
    with pytest.warns(UserWarning, match="not gf/activation_mb_vanilla"):
        rows = _fit(module, tmp_path)
    assert len(rows) == 2 and rows[0]["gf/activation_mb"] > 0 and "gf/activation_mb_vanilla" not in rows[0]


def test_scripted_model_is_refused_with_what_to_do():
    net = torch.jit.script(_two_convs())
    with pytest.raises(TypeError, match="TorchScript modules are not supported: the model is torch.jit.script"
                                        r".*Apply the filter to the eager model"):
        apply_gradient_filter(net, r=2, depth=1, example_input=torch.zeros(1, 8, 8, 8))
