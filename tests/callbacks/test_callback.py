"""GradientFilterCallback in a real Lightning fit, with both Lightning namespaces."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gf.surgery.class_swap import is_swapped
from tests.helpers.lightning import (
    NAMESPACES,
    lit_tiny_class,
    namespace_of,
    trainer_for,
)


def _probe_class(pl):
    class Probe(pl.Callback):
        def __init__(self) -> None:
            self.filtered: set[str] = set()
            self.bn_training: set[bool] = set()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.filtered |= {n for n, m in pl_module.named_modules() if is_swapped(m) and isinstance(m, nn.Conv2d)}
            self.bn_training |= {m.training for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)}

    return Probe


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_fit_filters_logs_checkpoints_and_tears_down(namespace, tmp_path):
    pl, Callback = namespace_of(namespace)
    LitTiny = lit_tiny_class(pl)
    torch.manual_seed(0)
    model = LitTiny()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb, probe = Callback(r=2, depth=2), _probe_class(pl)()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer_for(pl, tmp_path, [cb, probe, ckpt]).fit(model)

    assert probe.filtered == {"model.block.0", "model.last.0"}
    assert probe.bn_training == {False}  # BN kept in eval through Lightning's model.train() calls
    metrics = model.trainer.logged_metrics
    assert metrics["gf/activation_mb"] > 0
    assert metrics["gf/activation_mb_vanilla"] > metrics["gf/activation_mb"]
    torch.testing.assert_close(
        metrics["gf/memory_saved_mb"], metrics["gf/activation_mb_vanilla"] - metrics["gf/activation_mb"]
    )
    assert metrics["gf/backward_gflops_saved"] > 0
    # frozen part untouched, trained part moved
    now = dict(model.named_parameters())
    assert torch.equal(now["model.stem.0.weight"], start["model.stem.0.weight"])
    assert not torch.equal(now["model.last.0.weight"], start["model.last.0.weight"])
    assert not torch.equal(now["model.se.weight"], start["model.se.weight"])
    # torn down: plain model again, flags restored
    assert cb.handle is None
    assert not any(is_swapped(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    # a checkpoint written mid-fit loads strictly into the unpatched model
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert files
    state = torch.load(files[0], weights_only=False)
    LitTiny().load_state_dict(state["state_dict"], strict=True)
    (cb_state,) = [v for k, v in state["callbacks"].items() if "GradientFilterCallback" in k]
    assert cb_state == cb.config() and cb_state["depth"] == 2


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_first_batch_is_used_without_moving_the_data_order(namespace, tmp_path):
    pl, Callback = namespace_of(namespace)
    LitTiny = lit_tiny_class(pl)
    seen = {}
    for use_cb in (False, True):
        pl.seed_everything(7)
        model = LitTiny(with_example=False)
        callbacks = [Callback(r=2, depth=1)] if use_cb else []
        trainer_for(pl, tmp_path, callbacks, num_sanity_val_steps=0).fit(model)
        seen[use_cb] = model.seen
    assert seen[True] == seen[False] and len(seen[True]) == 16


@pytest.mark.parametrize("namespace", list(NAMESPACES))
def test_other_stages_are_untouched(namespace, tmp_path):
    pl, Callback = namespace_of(namespace)
    model = lit_tiny_class(pl)()
    cb = Callback(r=2, depth=2)
    trainer_for(pl, tmp_path, [cb]).validate(model)
    assert cb.handle is None and not any(is_swapped(m) for m in model.modules())


def test_callback_of_one_namespace_is_a_callback_there():
    import lightning.pytorch as L
    import pytorch_lightning as pl

    from lightning_gf.callbacks.lightning import GradientFilterCallback as LCallback
    from lightning_gf.callbacks.pytorch_lightning import (
        GradientFilterCallback as PLCallback,
    )

    assert isinstance(PLCallback(), pl.Callback) and not isinstance(PLCallback(), L.Callback)
    assert isinstance(LCallback(), L.Callback) and not isinstance(LCallback(), pl.Callback)


def test_resume_with_other_configuration_warns():
    from lightning_gf import GradientFilterCallback

    cb = GradientFilterCallback(r=2, depth=3)
    with pytest.warns(UserWarning, match=r"different configuration \(r: checkpoint 4 -> now 2"):
        cb.load_state_dict({**cb.config(), "r": 4})
