"""Edge cases, each with one clear expected outcome."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gf import GradientFilterCallback, apply_gradient_filter, filtered_conv2d
from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.models import KwargsDictModel, TinyCNN
from tests.helpers.reference import reference_grads


def _grads(x, w, b, gy, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    filtered_conv2d(*leaves, **kwargs).backward(gy)
    return [t.grad for t in leaves]


def _check_against_reference(x, w, b, *, r, stride=1, padding=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(F.conv2d(x, w, b, stride, padding).shape, generator=g, dtype=x.dtype)
    got = _grads(x, w, b, gy, stride=stride, padding=padding, r=r)
    s = (stride, stride) if isinstance(stride, int) else stride
    want = reference_grads(x, w, b, gy, stride=s, padding=padding, dilation=(1, 1), groups=1, r=r,
                           stride_correction=True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    return got


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_r_larger_than_the_map_is_one_global_patch():
    x, w, b = _t(2, 3, 5, 5), _t(4, 3, 3, 3, seed=1), _t(4, seed=2)
    g_x, g_w, _ = _check_against_reference(x, w, b, r=8, padding=1)
    # one patch: every tap of a channel pair shares one value, and g_x is one value per (n, c)
    assert torch.equal(g_w, g_w[:, :, :1, :1].expand_as(g_w))
    assert torch.equal(g_x, g_x[:, :, :1, :1].expand_as(g_x))


def test_map_smaller_than_r_is_skipped_by_the_surgery_and_trains_exactly():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)  # 8x8 output
            self.b = nn.Conv2d(4, 4, 3, stride=4, padding=1)  # 2x2 output, smaller than r=4

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    net, plain = Net(), Net()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 8, 8)
    handle = apply_gradient_filter(net, r=4, depth=1, example_input=x[:1], freeze=False)
    assert [layer.name for layer in handle.layers] == ["a"]
    net(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    assert torch.equal(net.b.weight.grad, plain.b.weight.grad)  # b is a plain conv
    with pytest.raises(ValueError, match="depth=2 but the model has only 1 eligible"):
        apply_gradient_filter(Net(), r=4, depth=2, example_input=x[:1])


def test_one_by_one_maps():
    # a 1x1 conv on a 1x1 map: the only patch is the map itself, so filtering is exact
    x, w, b = _t(3, 4, 1, 1), _t(5, 4, 1, 1, seed=1), _t(5, seed=2)
    gy = _t(3, 5, 1, 1, seed=3)
    got = _grads(x, w, b, gy, r=2)
    want = torch.autograd.grad(F.conv2d(*[t.requires_grad_() for t in (x, w, b)]), (x, w, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    # a 3x3 conv on a 1x1 map agrees with the reference (only the centre tap sees data)
    _check_against_reference(_t(2, 3, 1, 1), _t(4, 3, 3, 3, seed=1), _t(4, seed=2), r=2, padding=1)


def test_batch_of_one():
    _check_against_reference(_t(1, 3, 7, 6), _t(4, 3, 3, 3, seed=1), _t(4, seed=2), r=2, padding=1)
    model = TinyCNN()
    apply_gradient_filter(model, r=2, depth=2, example_input=torch.zeros(1, 3, 16, 16))
    model.train()  # BN stays in eval, so a batch of one trains
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    assert model.last[0].weight.grad is not None


@pytest.mark.parametrize("make", [
    lambda t: t[:, :3, ::2, ::2],  # strided view
    lambda t: t[:, :3].transpose(2, 3),  # transposed spatial axes
    lambda t: t[:, 1:4],  # channel slice
])
def test_non_contiguous_input_gives_the_contiguous_result(make):
    big = _t(2, 5, 12, 12)
    x = make(big)
    assert not x.is_contiguous()
    w, b = _t(4, 3, 3, 3, seed=1), _t(4, seed=2)
    gy = _t(*F.conv2d(x, w, b, padding=1).shape, seed=3)
    got = _grads(x, w, b, gy, padding=1, r=2)
    want = _grads(x.contiguous(), w, b, gy, padding=1, r=2)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", [lambda y: y.pow(2).sum(), lambda y: y.sum()], ids=["square", "linear"])
def test_double_backward_raises_a_clear_error(loss):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(loss(filtered_conv2d(x, w, padding=1, r=2)), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"lightning_gf: a filtered conv has no double backward.*exclude="):
        gx.pow(2).sum().backward()
    # a first-order backward with create_graph=False is unaffected
    (gx1,) = torch.autograd.grad(loss(filtered_conv2d(x, w, padding=1, r=2)), x)
    torch.testing.assert_close(gx1, gx.detach())


def test_shared_conv_called_twice_gets_the_sum_of_both_filtered_gradients():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            self.h0 = self.pre(x)
            self.y1 = self.shared(self.h0)
            self.h1 = torch.relu(self.y1)
            self.y2 = self.shared(self.h1)
            return self.y2

    model = Twice().double()
    x = _t(2, 3, 8, 8)
    apply_gradient_filter(model, r=2, depth=1, example_input=x[:1])
    model(x)
    for t in (model.y1, model.y2):
        t.retain_grad()
    model.y2.pow(2).sum().backward()
    w, b = model.shared.weight.detach(), model.shared.bias.detach()
    kwargs = dict(stride=(1, 1), padding=1, dilation=(1, 1), groups=1, r=2, stride_correction=True)
    _, gw1, gb1 = reference_grads(model.h0.detach(), w, b, model.y1.grad, **kwargs)
    _, gw2, gb2 = reference_grads(model.h1.detach(), w, b, model.y2.grad, **kwargs)
    torch.testing.assert_close(model.shared.weight.grad, gw1 + gw2)
    torch.testing.assert_close(model.shared.bias.grad, gb1 + gb2)


def test_user_frozen_conv_inside_the_target_range():
    model = TinyCNN()
    model.block[0].weight.requires_grad_(False)
    model.block[0].bias.requires_grad_(False)
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=torch.zeros(1, 3, 16, 16), freeze=False)
    assert [layer.name for layer in handle.layers] == ["block.0", "last.0"]  # still counted
    handle.reset_stats()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    block_stats = model.block[0].gf_stats
    assert block_stats.kept_bytes == 0 and block_stats.vanilla_bytes == 0  # nothing pooled for a frozen weight
    assert model.block[0].weight.grad is None
    assert model.stem[0].weight.grad is not None  # gradient still flows through it (filtered g_x)
    handle.remove()
    assert not model.block[0].weight.requires_grad and model.stem[0].weight.requires_grad  # user's flags kept


def _fit(module, callbacks, steps=2):
    pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(module)


class _Probe(pl.Callback):
    def __init__(self) -> None:
        self.filtered: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.filtered |= {n for n, m in pl_module.named_modules() if is_swapped(m) and isinstance(m, nn.Conv2d)}


def test_forward_with_keyword_arguments_returning_a_dict():
    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = KwargsDictModel()
            self.example_input_array = {"image": torch.zeros(1, 3, 8, 8), "scale": 0.5}

        def forward(self, image, scale=1.0):
            return self.net(image, scale=scale)

        def training_step(self, batch, batch_idx):
            out = self(image=batch[0], scale=0.5)
            return out["out"].pow(2).mean() + out["aux"].pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(4, 3, 8, 8)), batch_size=2)

    probe = _Probe()
    _fit(Lit(), [GradientFilterCallback(r=2, depth=2), probe])
    assert probe.filtered == {"net.b", "net.aux"}


def test_smp_model_with_aux_head_returning_a_tuple():
    smp = pytest.importorskip("segmentation_models_pytorch")

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = smp.Unet("resnet18", encoder_weights=None, classes=2, aux_params={"classes": 3})

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, mask, label = batch
            seg, logits = self(x)  # a tuple: (mask, label)
            return F.cross_entropy(seg, mask) + F.cross_entropy(logits, label)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 2, (4, 32, 32), generator=g),
                                 torch.randint(0, 3, (4,), generator=g))
            return DataLoader(data, batch_size=2)

    module = Lit()
    head = module.net.segmentation_head[0].weight.detach().clone()
    probe = _Probe()
    _fit(module, [GradientFilterCallback(r=2, depth=3), probe])  # example input: the first batch's image
    assert probe.filtered == {"net.decoder.blocks.4.conv1.0", "net.decoder.blocks.4.conv2.0",
                              "net.segmentation_head.0"}
    assert not torch.equal(module.net.segmentation_head[0].weight, head)


def _configured_class(base):
    class Configured(base):
        """Builds its layers in configure_model (Lightning calls it after the callbacks' setup)."""

        def __init__(self, idempotent: bool = True) -> None:
            super().__init__()
            self.idempotent = idempotent
            self.model = None
            self.example_input_array = torch.zeros(1, 3, 16, 16)

        def configure_model(self):
            if self.idempotent and self.model is not None:
                return
            self.model = TinyCNN()

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            self.optimized = [n for n, p in self.named_parameters() if p.requires_grad]
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 3), batch_size=4)

    return Configured


_Configured = _configured_class(pl.LightningModule)


def test_model_built_in_configure_model_is_filtered():
    module, probe = _Configured(), _Probe()
    _fit(module, [GradientFilterCallback(r=2, depth=2), probe])
    assert probe.filtered == {"model.block.0", "model.last.0"}
    assert "model.stem.0.weight" not in module.optimized  # frozen before the optimizer was built
    assert "model.last.0.weight" in module.optimized


def test_configure_model_that_rebuilds_the_layers_is_refused():
    with pytest.raises(RuntimeError, match=r"no longer in the model.*configure_model.*return early"):
        _fit(_Configured(idempotent=False), [GradientFilterCallback(r=2, depth=2)])


def test_configure_model_with_the_lightning_namespace():
    import lightning.pytorch as L

    from lightning_gf.callbacks.lightning import GradientFilterCallback as LCallback

    module = _configured_class(L.LightningModule)()
    seen = set()

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.update(n for n, m in pl_module.named_modules() if is_swapped(m) and isinstance(m, nn.Conv2d))

    L.Trainer(
        max_steps=2, accelerator="cpu", devices=1, callbacks=[LCallback(r=2, depth=2), Probe()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ).fit(module)
    assert seen == {"model.block.0", "model.last.0"} and "model.stem.0.weight" not in module.optimized
