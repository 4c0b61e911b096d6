"""The ``lightning-gf`` console script: ``LightningCLI`` over this package's modules.

    lightning-gf fit --config recipes/resnet18_gf_depth2.yaml
    lightning-gf fit --config recipes/resnet18_gf_depth2.yaml --config recipes/data/cifar10.yaml
    lightning-gf fit --config recipes/resnet18_gf_depth2.yaml --print_config
    lightning-gf report --config recipes/resnet18_gf_depth2.yaml --json

Models and data are given in subclass mode (``class_path`` + ``init_args``); the short
names of this package's classes (``ImageClassifier``, ``ShapesDataModule``,
``GradientFilterCallback``, ...) resolve without their module path.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

import lightning_gf.app.data  # noqa: F401  (registers the data modules for short names)
import lightning_gf.app.models  # noqa: F401  (registers the LightningModules for short names)
from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback  # noqa: F401  (short name in trainer.callbacks)

try:  # pytorch_lightning still calls jsonargparse APIs that jsonargparse deprecated
    from jsonargparse._deprecated import (
        JsonargparseDeprecationWarning as _JsonargparseDeprecation,
    )
except ImportError:  # pragma: no cover - other jsonargparse versions
    _JsonargparseDeprecation = DeprecationWarning  # type: ignore[assignment,misc]


class GradientFilterCLI(LightningCLI):
    """``LightningCLI`` whose ``model.init_args.num_classes`` comes from ``data.num_classes``.

    Every data module of this package has ``num_classes``; so do both task modules.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def build_cli(args: Optional[list[str]] = None, *, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``) and, with ``run=True``, run the subcommand.

    Example:
        >>> cli = build_cli(["--model=ImageClassifier", "--data=ShapesDataModule", "--data.task=segmentation",
        ...                  "--trainer.logger=false", "--trainer.enable_checkpointing=false"], run=False)
        >>> type(cli.model).__name__, cli.model.hparams.num_classes
        ('ImageClassifier', 9)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=_JsonargparseDeprecation)
        # ``args`` are the arguments here (the console script hands over sys.argv[1:]), not a second set
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return GradientFilterCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            save_config_kwargs={"overwrite": True},
        )


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of ``lightning-gf`` and ``python -m lightning_gf``.

    ``lightning-gf report --config X.yaml [--json]`` prints the per-layer report of a
    recipe (see :mod:`lightning_gf.app.config_report`); every other subcommand is LightningCLI's.
    """
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["report"]:
        from lightning_gf.app.config_report import main as report_main

        raise SystemExit(report_main(argv[1:]))
    build_cli(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
