"""Mixed precision and channels_last with the filter, in a Lightning fit and through whole models."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_gf import GradientFilterCallback, apply_gradient_filter
from tests.helpers.models import TinyCNN

# docs/reliability.md states these: relative L2 error of each trained parameter's
# gradient, mixed precision against the float32 filtered gradient, same weights, same batch
BF16_TOL = 5e-2
FP16_TOL = 1e-2


class GradsAtFirstStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = TinyCNN()
        self.example_input_array = torch.zeros(1, 3, 16, 16)
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
        self.grads: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self(self.x.to(self.device)), self.y.to(self.device))
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer):
        if not self.grads:
            self.grads = {n: p.grad.detach().float().cpu().clone() for n, p in self.named_parameters()
                          if p.grad is not None}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return [0, 1, 2]


def _fit(precision: str, accelerator: str = "cpu") -> GradsAtFirstStep:
    module = GradsAtFirstStep()
    pl.Trainer(
        max_steps=3, accelerator=accelerator, devices=1, precision=precision, logger=False,
        callbacks=[GradientFilterCallback(r=2, depth=2)], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(module)
    return module


def _relative_errors(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {n: ((a[n] - b[n]).norm() / b[n].norm()).item() for n in a}


@pytest.mark.parametrize(
    "precision,accelerator,tol",
    [
        ("bf16-mixed", "cpu", BF16_TOL),
        pytest.param("16-mixed", "gpu", FP16_TOL,
                     marks=pytest.mark.gpu),
    ],
)
def test_mixed_precision_gradients_close_to_float32(precision, accelerator, tol):
    full = _fit("32-true", accelerator)
    mixed = _fit(precision, accelerator)
    assert {"model.block.0.weight", "model.last.0.weight", "model.head.weight"} <= set(full.grads)
    errors = _relative_errors(mixed.grads, full.grads)
    assert max(errors.values()) < tol, errors
    assert all(torch.isfinite(torch.tensor(mixed.losses)))
    assert mixed.grads["model.last.0.weight"].dtype == torch.float32


@pytest.mark.parametrize("lean", [False, True])
def test_pooled_sums_are_float32_under_autocast(lean):
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=torch.zeros(1, 3, 16, 16), lean=lean)
    x = torch.randn(2, 3, 16, 16)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    assert y.dtype == torch.bfloat16
    # last.0 is 8 -> 16 channels on 8x8 maps: its pooled input is (2, 8, 4, 4)
    pooled = [t for t in kept if t.shape == (2, 8, 4, 4)]
    assert pooled and all(t.dtype == torch.float32 for t in pooled)
    if not lean:  # with lean=True the BatchNorm pooled sums are among them too
        assert handle.stats.kept_bytes == sum(t.numel() * 4 for t in pooled)
    y.float().sum().backward()  # no dtype error in backward
    for layer in handle.layers:
        assert layer.module.weight.grad.dtype == torch.float32


def test_channels_last_through_a_whole_model():
    torch.manual_seed(0)
    plain = TinyCNN()
    model = TinyCNN()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = model if fmt is torch.channels_last else plain
        m.to(memory_format=fmt)
        handle = apply_gradient_filter(m, r=2, depth=3, example_input=x[:1], freeze=False)
        assert [l.name for l in handle.layers] == ["stem.0", "block.0", "last.0"]  # every eligible conv
        xi = x.clone().to(memory_format=fmt).requires_grad_()
        m(xi).pow(2).sum().backward()
        grads[fmt] = (xi.grad, {n: p.grad for n, p in m.named_parameters()})
    x_grad, param_grads = grads[torch.channels_last]
    assert x_grad.is_contiguous(memory_format=torch.channels_last)
    for name in ("stem.0.weight", "block.0.weight", "last.0.weight"):
        assert param_grads[name].is_contiguous(memory_format=torch.channels_last), name
    torch.testing.assert_close(x_grad, grads[torch.contiguous_format][0])
    for name, g in param_grads.items():
        torch.testing.assert_close(g, grads[torch.contiguous_format][1][name], msg=name)
