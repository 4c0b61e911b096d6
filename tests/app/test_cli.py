"""The ``lightning-gf`` console script: subcommands, short names, several configs, ``--print_config``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_gf.app.cli import build_cli, main
from lightning_gf.app.data import CIFARDataModule
from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "resnet18_2L_gf.yaml"
TINY = ["--data.init_args.image_size=64", "--data.init_args.train_size=2", "--data.init_args.val_size=2",
        "--data.init_args.test_size=2", "--data.init_args.batch_size=2"]


def test_pyproject_declares_the_console_script() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'lightning-gf = "lightning_gf.app.cli:main"' in text


def test_print_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # `python -m lightning_gf` prints the merged config of a recipe plus an override ...
    run = subprocess.run(
        [sys.executable, "-m", "lightning_gf", "fit", f"--config={RECIPE}", "--model.init_args.lr=0.01",
         "--print_config"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=True,
    )
    out = run.stdout
    assert "args parameter is intended" not in run.stderr  # the console script's own args are no second set
    printed = yaml.safe_load(out)
    assert printed["model"]["init_args"]["lr"] == 0.01
    assert printed["trainer"]["callbacks"][0]["init_args"]["depth"] == 2
    # ... which, fed back to the entry function as the only config, prints the same config again
    saved = tmp_path / "config.yaml"
    saved.write_text(out)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--config={saved}", "--print_config"])
    assert not exit_info.value.code
    assert yaml.safe_load(capsys.readouterr().out) == printed


def test_short_names_and_several_configs(tmp_path: Path) -> None:
    data_config = tmp_path / "data.yaml"
    data_config.write_text(yaml.safe_dump({
        "data": {"class_path": "CIFARDataModule", "init_args": {"root": str(tmp_path), "variant": "cifar100"}},
        "trainer": {"callbacks": [{"class_path": "GradientFilterCallback", "init_args": {"r": 4, "depth": 1}}]},
    }))
    cli = build_cli([f"--config={RECIPE}", f"--config={data_config}", "--model=ImageClassifier",
                     "--model.model_name=resnet18", "--trainer.logger=false"], run=False)
    assert isinstance(cli.datamodule, CIFARDataModule) and cli.datamodule.variant == "cifar100"
    assert cli.model.hparams.num_classes == 100  # linked from data.num_classes
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientFilterCallback)]
    assert [(cb.r, cb.depth) for cb in callbacks] == [(4, 1)]


def test_fit_validate_test_predict(tmp_path: Path) -> None:
    cli = build_cli(["fit", f"--config={RECIPE}", *TINY, "--trainer.max_epochs=1",
                     f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert len(checkpoints) == 1 and cli.trainer.callback_metrics["train/loss"] > 0
    for command, metric in (("validate", "val/acc"), ("test", "test/acc")):
        cli = build_cli([command, f"--config={RECIPE}", *TINY, f"--ckpt_path={checkpoints[0]}",
                         "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                         f"--trainer.default_root_dir={tmp_path / command}"])
        assert 0.0 <= float(cli.trainer.callback_metrics[metric]) <= 1.0
    cli = build_cli(["predict", f"--config={RECIPE}", *TINY, f"--ckpt_path={checkpoints[0]}",
                     "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                     f"--trainer.default_root_dir={tmp_path / 'predict'}"])
    predictions = cli.trainer.predict_loop.predictions
    assert torch.cat(predictions).shape == (2,) and torch.cat(predictions).max() < 8


def test_main_runs_a_subcommand_and_rejects_bad_options(tmp_path: Path) -> None:
    args = ["fit", f"--config={RECIPE}", *TINY, "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}"]
    assert main(args) is None  # the console script exits 0
    with pytest.raises(ValueError, match="optimizer must be one of"):
        main([*args, "--model.init_args.optimizer=lbfgs"])
    with pytest.raises(SystemExit):  # unknown option: jsonargparse's usage error
        main([*args, "--model.init_args.no_such_option=1"])


@pytest.mark.parametrize("entry", ["fit", "report"])
def test_console_script_warns_nothing_about_its_own_args(entry, monkeypatch, tmp_path) -> None:
    # The console script hands sys.argv[1:] to LightningCLI as `args`, which warned on every call
    argv = ["lightning-gf", entry, f"--config={RECIPE}", "--print_config"]
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "fit":
            with pytest.raises(SystemExit):
                main()  # --print_config exits once parsed
        else:
            build_cli(argv[2:3] + ["--trainer.logger=false"], run=False)  # what `report` builds
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
