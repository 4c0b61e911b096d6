"""The lean trained region: exact where the math allows, the patch-grid BN weight gradient otherwise."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_gf import apply_gradient_filter
from lightning_gf.ops.activation import lean_dropout, lean_relu
from lightning_gf.ops.batchnorm import lean_batch_norm
from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.models import TinyCNN, TwoStages

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("upper", [None, 6.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_lean_relu_is_exact(upper, inplace):
    base = torch.randn(3, 4, 5, 7, dtype=torch.float64) * 5
    base[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -0.0], dtype=torch.float64)  # the kinks
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    out = lean_relu(a * 1.0, inplace=inplace, upper=upper)
    ref = F.relu(b) if upper is None else F.relu6(b)
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_lean_relu_keeps_one_bit_per_element():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        lean_relu(x)
    assert [(t.dtype, t.numel()) for t in kept] == [(torch.uint8, x.numel() // 8)]


def test_lean_dropout_masks_and_scales_consistently():
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    out = lean_dropout(x, p=0.25)
    kept = out != 0
    assert 0.6 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def _patch_grid_bn_weight_grad(x, g, mean, var, eps, r):
    """Independent: sum over patches of mean(g) * sum((x - mean) / std), patches centred."""
    n, c, h, w = x.shape
    ph, pw = math.ceil(h / r), math.ceil(w / r)
    oh, ow = math.ceil((ph * r - h) / 2), math.ceil((pw * r - w) / 2)
    xhat = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps)
    total = torch.zeros(c, dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            rows = slice(max(i * r - oh, 0), min((i + 1) * r - oh, h))
            cols = slice(max(j * r - ow, 0), min((j + 1) * r - ow, w))
            total += (g[:, :, rows, cols].mean((2, 3)) * xhat[:, :, rows, cols].sum((2, 3))).sum(0)
    return total


@pytest.mark.parametrize("size,r", [((8, 8), 2), ((7, 9), 2), ((10, 11), 3)])
def test_lean_batch_norm(size, r, backend):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = lean_batch_norm(leaves[0], mean, var, leaves[1], leaves[2], 1e-5, r)
    want = F.batch_norm(ref[0], mean, var, ref[1], ref[2], False, 0.0, 1e-5)
    assert torch.equal(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(leaves[0].grad, ref[0].grad)  # exact
    torch.testing.assert_close(leaves[2].grad, ref[2].grad)  # exact
    torch.testing.assert_close(leaves[1].grad, _patch_grid_bn_weight_grad(x, g, mean, var, 1e-5, r))


def test_lean_batch_norm_keeps_nothing_with_frozen_affine():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        lean_batch_norm(x, torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), 1e-5, 2)
    assert all(t is None or t.numel() == 3 for t in kept)


def _saved_bytes(model, x):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return sum(storages.values()), out


def test_lean_region_in_a_model():
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    # region: from block.0 on; the stem's BN and ReLU are not in it
    assert handle.lean_modules == ["block.1", "block.2", "last.1", "last.2"]
    assert not is_swapped(model.stem[2])
    model.train()
    lean_bytes, out = _saved_bytes(model, X)
    with handle.plain():
        plain_bytes, _ = _saved_bytes(model, X)
    assert lean_bytes < 0.25 * plain_bytes
    handle.remove()
    assert not any(is_swapped(m) for m in model.modules())


def test_plain_mode_is_vanilla_backprop_with_the_same_trainable_set():
    model = TinyCNN()
    reference = copy.deepcopy(model)
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    for name, p in reference.named_parameters():
        p.requires_grad_(dict(model.named_parameters())[name].requires_grad)
    reference.eval()  # BN in eval, as bn_eval keeps it
    model.train()
    with handle.plain():
        model(X).pow(2).sum().backward()
    reference(X).pow(2).sum().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_lean_changes_only_the_batchnorm_weight_gradients_on_timm_mobilenetv2():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    grads = {}
    for lean in (False, True):
        model = copy.deepcopy(net)
        handle = apply_gradient_filter(model, r=2, depth=4, example_input=x[:1], lean=lean)
        model.train()
        model(x).pow(2).sum().backward()
        grads[lean] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if lean:
            assert any("bn" in name for name in handle.lean_modules)
    assert grads[True].keys() == grads[False].keys()
    bn_weights = {n for n in grads[True] if n.split(".")[-2].startswith("bn") and n.endswith(".weight")}
    assert bn_weights
    for name in grads[True]:
        if name in bn_weights:
            continue
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-6)
    for name in bn_weights:  # the patch-grid approximation: checked exactly below
        assert not torch.allclose(grads[True][name], grads[False][name]), name


def _lean_bn_grads_against_the_patch_grid(model, x, expected_r):
    """Run the lean model in float64 and compare each named BatchNorm's weight gradient with
    :func:`_patch_grid_bn_weight_grad` at the ``r`` it is expected to take (and has, ``gf_r``)."""
    seen, hooks = {}, []
    modules = dict(model.named_modules())
    for name in expected_r:
        bn = modules[name]

        def keep_input(module, args, name=name):
            seen[name, "x"] = args[0].detach()

        def keep_grad(module, args, name=name):  # the input of what follows the batch norm is its output
            args[0].register_hook(lambda grad: seen.__setitem__((name, "g"), grad.detach()))

        hooks.append(bn.register_forward_pre_hook(keep_input))
        after = getattr(bn, "drop", None)  # timm's BatchNormAct2d: batch norm, then drop, then act
        if after is not None:
            hooks.append(after.register_forward_pre_hook(keep_grad))
        else:
            hooks.append(bn.register_forward_hook(lambda m, args, out, name=name: keep_grad(m, (out,), name)))
    model(x).pow(2).sum().backward()
    for h in hooks:
        h.remove()
    for name, r in expected_r.items():
        bn = modules[name]
        assert bn.gf_r == r, name
        expected = _patch_grid_bn_weight_grad(seen[name, "x"], seen[name, "g"], bn.running_mean, bn.running_var,
                                              bn.eps, r)
        torch.testing.assert_close(bn.weight.grad, expected, rtol=1e-10, atol=1e-12)


def test_lean_batchnorm_weight_gradient_is_the_patch_grid_formula_on_timm_mobilenetv2():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=4).double()
    with torch.no_grad():  # running statistics and affine parameters away from their initial 0 / 1
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    x = torch.randn(2, 3, 72, 72, dtype=torch.float64)  # odd maps near the head: 3 x 3 at r = 2
    handle = apply_gradient_filter(model, r=2, depth=4, example_input=x[:1])
    model.train()
    bns = {name: 2 for name in handle.lean_modules if name.split(".")[-1].startswith("bn")}
    assert len(bns) >= 3
    _lean_bn_grads_against_the_patch_grid(model, x, bns)


def test_each_lean_module_takes_the_r_of_the_last_filtered_conv_before_it():
    # the DeepLabV3 recipes give r per layer; a lean BN after conv b pools on b's grid, not a's
    torch.manual_seed(0)
    model = TwoStages().double()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 13, 13, dtype=torch.float64)
    handle = apply_gradient_filter(model, r={"a": 2, "b": 4, "c": 3}, depth=3, example_input=x[:1])
    model.train()
    assert sorted(handle.lean_modules) == ["bn_a", "bn_b"]
    _lean_bn_grads_against_the_patch_grid(model, x, {"bn_a": 2, "bn_b": 4})
