"""A real 2-process DDP fit (gloo, CPU) with the callback, and the refusal of sharded strategies.

The suite runs ``strategy="ddp_fork"``: Lightning's DDPStrategy with forked workers, so
no interpreter has to import torch and Lightning again (tens of seconds on a busy
2-core machine). ``GF_SLOW_TESTS=1`` also runs ``strategy="ddp"`` launched as scripts,
the way torchrun starts them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.models import TinyCNN

ROOT = Path(__file__).resolve().parents[2]


def _check_ranks(out: Path) -> None:
    r0, r1 = (torch.load(out / f"rank{k}.pt", weights_only=False) for k in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # both ranks filtered the same layers and ran every step (an unused-parameter error would stop step 2)
    assert r0["filtered"] == r1["filtered"] == ["model.block.0", "model.last.0"]
    assert r0["steps"] == r1["steps"] == 4
    # they saw different samples, yet end with identical weights: gradients were all-reduced
    assert set(r0["seen"][:8]).isdisjoint(r1["seen"][:8])  # epoch 1: DistributedSampler halves
    for name, value in r0["state_dict"].items():
        assert torch.equal(value, r1["state_dict"][name]), name
    # training moved the trained part, not the frozen stem
    torch.manual_seed(0)
    start = TinyCNN().state_dict()
    assert torch.equal(r0["state_dict"]["model.stem.0.weight"], start["stem.0.weight"])
    assert not torch.equal(r0["state_dict"]["model.last.0.weight"], start["last.0.weight"])
    assert "model.stem.0.weight" in r0["frozen_during_fit"]


def test_ddp_fork_two_processes_train_in_sync(tmp_path):
    from tests.helpers.ddp_fit import fit

    fit(tmp_path, strategy="ddp_fork")
    _check_ranks(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_launched_as_two_scripts(tmp_path):
    """strategy='ddp' with both ranks started at once, as torchrun would."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": "0", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, "tests/helpers/ddp_fit.py", str(tmp_path)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    _check_ranks(tmp_path)


@pytest.mark.parametrize("strategy_name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharded_strategies_are_refused_clearly(strategy_name):
    import types

    import pytorch_lightning as pl

    from lightning_gf import GradientFilterCallback
    from lightning_gf.surgery.class_swap import is_swapped

    if strategy_name == "FSDPStrategy":
        strategy = pl.strategies.FSDPStrategy()  # the real class
    else:  # DeepSpeed is not installed here: a stand-in class of the same name
        strategy = type(strategy_name, (), {})()
    module = pl.LightningModule()
    module.net = TinyCNN()
    module.example_input_array = torch.zeros(1, 3, 16, 16)
    trainer = types.SimpleNamespace(strategy=strategy)
    with pytest.raises(RuntimeError, match=r"does not support .*use strategy='ddp'"):
        GradientFilterCallback(r=2, depth=2).setup(trainer, module, "fit")
    assert not any(is_swapped(m) for m in module.modules())
