"""gradient_fidelity: known exact answers, agreement with an independent computation, model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_gf import apply_gradient_filter
from lightning_gf.diagnostics.fidelity import fidelity_with_handle, gradient_fidelity
from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.models import TinyCNN


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _cross_entropy(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _tiny_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 0])


def test_r1_gives_cosine_one_and_ratio_one_everywhere():
    torch.manual_seed(0)
    model = TinyCNN()
    result = gradient_fidelity(model, _tiny_batch(), _cross_entropy, r=1, depth=3)
    assert [layer.name for layer in result.layers] == ["block.0", "se", "last.0"]
    values = [v for layer in result.layers for v in (layer.gw_cos, layer.gw_norm_ratio, layer.gx_cos, layer.gx_norm_ratio)]
    assert result.layers[0].gx_cos is None  # first filtered layer: its input needs no grad
    assert sum(v is not None for v in values) == 10
    for v in values:
        if v is not None:
            assert v == pytest.approx(1.0, abs=1e-6)


def test_same_dropout_masks_in_both_passes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(6, 6, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    result = gradient_fidelity(model, x, lambda m, b: m(b).square().sum(), r=1, depth=2)
    assert result.layers[0].gw_cos == pytest.approx(1.0, abs=1e-6)
    assert result.layers[0].gw_norm_ratio == pytest.approx(1.0, abs=1e-6)


def test_agrees_with_an_independent_computation_at_r2():
    torch.manual_seed(0)
    model = TinyCNN()
    batch = _tiny_batch()
    result = gradient_fidelity(model, batch, _cross_entropy, r=2, depth=2).as_dict()
    grads = {}
    for r in (1, 2):
        twin = copy.deepcopy(model).train()
        # r = 1 runs plain convs; same layers, same frozen parameters, BN in eval
        handle = apply_gradient_filter(twin, r=r, depth=2, example_input=batch[0], include=["block.0", "last.0"])
        _cross_entropy(twin, batch).backward()
        grads[r] = {layer.name: layer.module.weight.grad for layer in handle.layers}
    assert set(result) == set(grads[2]) == {"block.0", "last.0"}
    for name, exact in grads[1].items():
        filtered = grads[2][name]
        assert result[name]["gw_cos"] == pytest.approx(_cos(filtered, exact), abs=1e-9)
        assert result[name]["gw_norm_ratio"] == pytest.approx(float(filtered.norm() / exact.norm()), rel=1e-5)
        assert result[name]["gw_cos"] < 0.9999  # r = 2 really filters


def test_1x1_conv_with_patch_constant_output_gradient_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # constant on 2x2 patches
    result = gradient_fidelity(model, x, lambda m, b: (m(b) * target).sum(), r=2, depth=1)
    (layer,) = result.layers
    for v in (layer.gw_cos, layer.gw_norm_ratio, layer.gx_cos, layer.gx_norm_ratio):
        assert v == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("stride, size, paper_ratio", [(1, 10, 1.0), (2, 9, 4.0)])
def test_constant_input_map_makes_the_weight_gradient_exact(stride, size, paper_ratio):
    """A valid conv on a channel-wise constant map: every tap sees the same value, so the
    tap-constant filtered g_w is exact (with the stride correction), for any output gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=stride))
    x = torch.randn(2, 3, 1, 1).expand(2, 3, size, size).contiguous()
    out = (size - 3) // stride + 1
    probe = torch.randn(2, 4, out, out)

    def loss_fn(m, b):
        return (m(b).tanh() * probe).sum()

    corrected = gradient_fidelity(model, x, loss_fn, r=2, depth=1).layers[0]
    paper = gradient_fidelity(model, x, loss_fn, r=2, depth=1, stride_correction=False).layers[0]
    assert corrected.gw_cos == pytest.approx(1.0, abs=1e-6)
    assert corrected.gw_norm_ratio == pytest.approx(1.0, abs=1e-5)
    assert paper.gw_cos == pytest.approx(1.0, abs=1e-6)
    assert paper.gw_norm_ratio == pytest.approx(paper_ratio, rel=1e-5)
    assert corrected.gx_cos is None  # the input needs no grad


def test_model_is_left_exactly_as_it_was():
    torch.manual_seed(0)
    model = TinyCNN()
    model.train()
    model.head.eval()
    model.stem[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    # bn_eval=False: BatchNorm runs in train mode and would update its running stats
    gradient_fidelity(model, _tiny_batch(), _cross_entropy, r=2, depth=2, bn_eval=False)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert not any(is_swapped(m) for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_with_an_installed_filter_the_handle_stays_as_it_was():
    torch.manual_seed(0)
    model = TinyCNN()
    batch = _tiny_batch()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=batch[0])
    _cross_entropy(model, batch)  # some stats
    before = handle.stats
    with pytest.raises(RuntimeError, match="fidelity_with_handle"):
        gradient_fidelity(model, batch, _cross_entropy, r=2, depth=2)
    result = fidelity_with_handle(model, batch, _cross_entropy, handle)
    assert [layer.name for layer in result.layers] == ["block.0", "last.0"]
    assert 0.0 < result.layers[1].gw_cos < 1.0
    assert handle.stats == before
    assert [layer.module.gf_r for layer in handle.layers] == [2, 2]
    assert all(is_swapped(layer.module) for layer in handle.layers)
    handle.remove()


def test_bad_loss_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match="scalar tensor"):
        gradient_fidelity(model, x, lambda m, b: m(b), r=2, depth=1)
    with pytest.raises(ValueError, match="does not require grad"):
        gradient_fidelity(model, x, lambda m, b: m(b).sum().detach(), r=2, depth=1)
    assert not any(is_swapped(m) for m in model.modules())


def test_callback_logs_fidelity_only_when_asked(tmp_path):
    import pytorch_lightning as pl

    from lightning_gf import GradientFilterCallback
    from tests.helpers.lightning import lit_tiny_class, trainer_for

    LitTiny = lit_tiny_class(pl)
    logged = {}
    for every in (0, 2):
        torch.manual_seed(0)
        model = LitTiny()
        trainer_for(pl, tmp_path, [GradientFilterCallback(r=2, depth=2, fidelity_every_n_steps=every)]).fit(model)
        logged[every] = dict(model.trainer.logged_metrics)
        # 4 steps of 4 samples, plus two extra training_step calls (exact, filtered) at steps 0 and 2
        assert len(model.seen) == 16 + (16 if every else 0)
    assert not any(k.startswith("gf/fidelity") for k in logged[0])
    for name in ("model.block.0", "model.last.0"):
        assert -1.0 <= float(logged[2][f"gf/fidelity/{name}/gw_cos"]) <= 1.0
        assert float(logged[2][f"gf/fidelity/{name}/gw_norm_ratio"]) > 0
    assert "gf/fidelity/model.last.0/gx_cos" in logged[2]
    assert "gf/fidelity/model.block.0/gx_cos" not in logged[2]  # its input needs no grad
    with pytest.raises(ValueError, match="fidelity_every_n_steps"):
        GradientFilterCallback(fidelity_every_n_steps=-1)
