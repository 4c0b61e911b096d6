"""apply_gradient_filter on hand-made models, without Lightning."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from lightning_gf import apply_gradient_filter
from lightning_gf.ops.conv import filtered_conv2d
from lightning_gf.surgery.class_swap import is_swapped
from lightning_gf.surgery.filtered_conv import FilteredConvMixin
from tests.helpers.models import Branchy, KwargsDictModel, TinyCNN, TwoStages

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _grads(model, x=X):
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_selects_last_convs_in_execution_order_not_registration_order():
    model = Branchy()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    # execution: stem, branch_a, branch_b, fuse
    assert [l.name for l in handle.layers] == ["branch_b", "fuse"]
    # branch_a ran (in full) before the first filtered layer started: frozen with the stem
    assert set(handle.frozen_parameters) == {"stem.weight", "stem.bias", "branch_a.weight", "branch_a.bias"}
    assert model.fuse.weight.requires_grad and model.branch_b.weight.requires_grad


def test_parallel_branches_depth3_and_atrous_layer_filtered():
    model = Branchy()
    handle = apply_gradient_filter(model, r=2, depth=3, example_input=X)
    assert [l.name for l in handle.layers] == ["branch_a", "branch_b", "fuse"]
    assert handle.frozen_parameters == ["stem.weight", "stem.bias"]
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("stem"))


def test_small_map_conv_not_counted_but_trains():
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    assert [l.name for l in handle.layers] == ["block.0", "last.0"]
    assert not isinstance(model.se, FilteredConvMixin)
    assert model.se.weight.requires_grad and model.head.weight.requires_grad
    assert not model.stem[0].weight.requires_grad and not model.stem[1].weight.requires_grad
    grads = _grads(model)
    assert "se.weight" in grads and "stem.0.weight" not in grads


def test_bn_stays_in_eval_mode_and_affine_still_learns():
    model = TinyCNN()
    apply_gradient_filter(model, r=2, depth=2, example_input=X)
    model.train()
    assert model.training and not model.last[1].training and not model.stem[1].training
    before = model.last[1].running_mean.clone()
    grads = _grads(model)
    assert torch.equal(model.last[1].running_mean, before)
    assert "last.1.weight" in grads


def test_forward_exact_and_gradients_are_the_filtered_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1))
    plain = copy.deepcopy(model)
    apply_gradient_filter(model, r=2, depth=2, example_input=X, freeze=False, stride_correction=False)
    assert torch.equal(model(X), plain(X))
    got = _grads(model)
    # manual composition of the op
    x = X
    h = torch.relu(filtered_conv2d(x, plain[0].weight, plain[0].bias, padding=1, r=2, stride_correction=False))
    y = filtered_conv2d(h, plain[2].weight, plain[2].bias, stride=2, padding=1, r=2, stride_correction=False)
    y.pow(2).sum().backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(got[name], p.grad)


def test_r1_patched_model_matches_vanilla_exactly():
    model = TinyCNN()
    plain = copy.deepcopy(model)
    apply_gradient_filter(model, r=1, depth=3, example_input=X, freeze=False, bn_eval=False)
    assert len([m for m in model.modules() if is_swapped(m)]) == 3
    got, want = _grads(model), _grads(plain)
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_patched_layers_stay_conv2d_and_keep_state_dict_keys():
    model = TinyCNN()
    keys = list(model.state_dict())
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    assert all(isinstance(l.module, nn.Conv2d) for l in handle.layers)
    assert list(model.state_dict()) == keys
    fresh = TinyCNN()
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_compute_with_their_own_weights(how):
    model = TinyCNN()
    apply_gradient_filter(model, r=2, depth=2, example_input=X)
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert isinstance(clone.last[0], FilteredConvMixin) and clone.last[0].gf_r == 2
    assert not clone.last[1].training  # bn_eval carried over
    clone.train()
    assert not clone.last[1].training
    with torch.no_grad():
        clone.last[0].weight.mul_(2)
    assert not torch.equal(clone(X), model(X))
    grads = _grads(clone)
    assert model.last[0].weight.grad is None and "last.0.weight" in grads
    # the copy's gradient is the filtered one for the copy's weights
    want = _grads(copy.deepcopy(clone))
    torch.testing.assert_close(grads["last.0.weight"], want["last.0.weight"])


def test_remove_restores_vanilla_behaviour_and_flags():
    model = TinyCNN()
    model.head.bias.requires_grad_(False)  # a user choice that must survive
    plain = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    model.train()
    _grads(model)
    handle.remove()
    handle.remove()  # idempotent
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in plain.named_parameters()
    }
    assert model.last[1].training  # BN follows model.train() again
    model.eval(), plain.eval()
    got, want = _grads(model), _grads(plain)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert handle.removed and "removed" in repr(handle)


def test_r_mapping_per_layer():
    model = Branchy()
    handle = apply_gradient_filter(model, r={"branch_*": 4, "fuse": 2}, depth=3, example_input=X)
    assert [(l.name, l.r) for l in handle.layers] == [("branch_a", 4), ("branch_b", 4), ("fuse", 2)]
    assert model.branch_a.gf_r == 4


def test_include_and_exclude():
    model = Branchy()
    handle = apply_gradient_filter(model, r=2, depth=1, example_input=X, exclude=["fuse"])
    assert [l.name for l in handle.layers] == ["branch_b"]
    assert model.fuse.weight.requires_grad  # runs after the first filtered layer
    handle.remove()
    handle = apply_gradient_filter(model, r=2, depth=1, example_input=X, include=["branch_a"])
    assert [l.name for l in handle.layers] == ["branch_a"]


def test_unsupported_convs_are_skipped_with_a_warning_naming_them():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        timm_layers.Conv2dSame(4, 4, 3),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    with pytest.warns(UserWarning, match=r"1 \(padding_mode='reflect'.*2 \(Conv2dSame overrides forward"):
        handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    assert [l.name for l in handle.layers] == ["0", "3"]
    assert not is_swapped(model[1]) and not is_swapped(model[2])


def test_non_overriding_conv_subclass_is_filtered():
    class MyConv(nn.Conv2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MyConv(4, 4, 3, padding=1))
    handle = apply_gradient_filter(model, r=2, depth=1, example_input=X)
    assert isinstance(model[1], MyConv) and isinstance(model[1], FilteredConvMixin)
    handle.remove()
    assert type(model[1]) is MyConv


def test_kwargs_input_and_dict_output():
    model = KwargsDictModel()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input={"image": X, "scale": 0.5})
    # aux head runs last, then b
    assert [l.name for l in handle.layers] == ["b", "aux"]


def test_shared_conv_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(self.pre(x))))

    model = Twice()
    handle = apply_gradient_filter(model, r=2, depth=1, example_input=X)
    assert [l.name for l in handle.layers] == ["shared"]
    handle.reset_stats()
    model(X).sum().backward()
    one_call = 2 * 4 * 8 * 8 * 4  # pooled input of one call: N*C*P bytes (float32)
    assert handle.stats.kept_bytes == 2 * one_call


def test_stats_read_off_kept_tensors():
    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    model.train()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = model(X)
    # block.0's input does not need a gradient (frozen stem), last.0's does
    s = handle.stats
    assert s.vanilla_bytes == (2 * 8 * 16 * 16 + 2 * 8 * 8 * 8) * 4
    # block.0 (stride 2): 16x16 input in 4x4 patches; last.0: 8x8 input in 2x2 patches
    assert s.kept_bytes == (2 * 8 * 4 * 4 + 2 * 8 * 4 * 4) * 4
    assert s.backward_macs_filtered < s.backward_macs_vanilla
    pooled = {tuple(t.shape) for t in kept}
    assert (2, 8, 4, 4) in pooled and (2, 8, 16, 16) not in pooled
    out.sum().backward()
    handle.reset_stats()
    assert handle.stats.kept_bytes == 0


def test_no_grad_forward_uses_plain_conv_and_records_nothing(monkeypatch):
    from lightning_gf.surgery import filtered_conv

    model = TinyCNN()
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["r"])
        return filtered_conv2d(*args, **kwargs)

    monkeypatch.setattr(filtered_conv, "filtered_conv2d", spy)  # observed, not replaced
    with torch.no_grad():
        out = model(X)
    assert calls == [] and handle.stats.kept_bytes == 0 and out.grad_fn is None
    model.train()
    model(X)
    assert calls == [2, 2]  # with grad, both filtered convs enter the op


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: a layer-scale ``gamma`` applied after its (filtered) child conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * self.conv(x)


def test_a_parameter_used_after_the_first_filtered_conv_stays_trainable():
    # the block's call starts before its conv (the first filtered one) but ends after it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), LayerScaleBlock(), nn.Conv2d(8, 2, 1))
    handle = apply_gradient_filter(model, r=2, depth=2, example_input=X)
    assert [layer.name for layer in handle.layers] == ["1.conv", "2"]
    assert handle.frozen_parameters == ["0.weight", "0.bias"]
    model(X).pow(2).sum().backward()
    assert model[1].gamma.grad is not None and model[1].gamma.grad.abs().sum() > 0


@pytest.mark.parametrize("r", [2, 4])
def test_a_map_of_exactly_r_by_r_is_filtered_and_a_smaller_one_is_not(r):
    # 16 -> (stride 2) 8 -> ... : the conv whose output is r x r is filtered, the one below r x r is not
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, stride=16 // r),  # out r x r
        nn.Conv2d(4, 4, 3, padding=1, stride=2),  # out (r / 2) x (r / 2): below r x r
    )
    handle = apply_gradient_filter(model, r=r, depth=2, example_input=X)
    assert [(layer.name, layer.out_size) for layer in handle.layers] == [("0", (16, 16)), ("1", (r, r))]
    assert not is_swapped(model[2]) and model[2].weight.requires_grad


def test_plain_sets_every_patched_module_to_r1_and_restores_each_r_even_on_error():
    model = TwoStages()
    handle = apply_gradient_filter(model, r={"a": 2, "b": 4, "c": 3}, depth=3, example_input=X)
    patched = {name: m for name, m in model.named_modules() if "gf_r" in m.__dict__}
    before = {name: m.gf_r for name, m in patched.items()}
    assert before == {"a": 2, "bn_a": 2, "b": 4, "bn_b": 4, "c": 3}
    with pytest.raises(KeyError):
        with handle.plain():
            assert {m.gf_r for m in patched.values()} == {1}
            raise KeyError("inside the block")
    assert {name: m.gf_r for name, m in patched.items()} == before


def test_example_input_array_attribute_is_used():
    model = TinyCNN()
    model.example_input_array = X
    handle = apply_gradient_filter(model, r=2, depth=1)
    assert [l.name for l in handle.layers] == ["last.0"]


def test_context_manager_removes():
    model = TinyCNN()
    with apply_gradient_filter(model, r=2, depth=1, example_input=X):
        assert is_swapped(model.last[0])
    assert not any(is_swapped(m) for m in model.modules())
