"""``lightning-gf report --config recipes/X.yaml``: the per-layer report of a recipe.

Builds the recipe's model, data and ``GradientFilterCallback`` exactly as ``fit`` would,
takes the first training batch, and prints :func:`lightning_gf.diagnostics.report.layer_report` for
the callback's options, with the ``g_w`` fidelity measured on the model's own
``training_step`` loss.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from lightning_gf.callbacks.base import GradientFilterCallbackBase
from lightning_gf.diagnostics.report import LayerReport, layer_report
from lightning_gf.surgery.tracing import model_input_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-gf report",
        description="Per-layer report (memory kept, backward multiply-adds, g_w fidelity) of a recipe's filter.",
    )
    p.add_argument("--config", action="append", required=True, help="LightningCLI config file (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-fidelity", action="store_true", help="skip the g_w cosine (faster)")
    return p


def report_for_config(configs: Sequence[str], *, fidelity: bool = True) -> LayerReport:
    """The :class:`~lightning_gf.diagnostics.report.LayerReport` of the recipe made of ``configs``.

    Example (builds the recipe's model and data, so not run as a doctest):
        >>> report = report_for_config(["recipes/resnet18_2L_gf.yaml"])  # doctest: +SKIP
        >>> [row.name for row in report.rows]  # doctest: +SKIP
        ['model.layer4.1.conv1', 'model.layer4.1.conv2']
    """
    from lightning_gf.app.cli import build_cli
    from lightning_gf.diagnostics.fidelity import training_step_loss

    args = [f"--config={c}" for c in configs] + ["--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    cli = build_cli(args, run=False)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientFilterCallbackBase)]
    if not callbacks:
        raise ValueError(f"no GradientFilterCallback in trainer.callbacks of {list(configs)}: nothing to report")
    cb = callbacks[0]
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    report = layer_report(cli.model, model_input_of(batch), config=cb.filter_config, loss_fn=training_step_loss(0),
                          batch=batch, fidelity=fidelity)
    report.config.update(configs=list(configs))
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``lightning-gf report``."""
    args = _parser().parse_args(argv)
    print("building the recipe and measuring ...", file=sys.stderr)
    try:
        report = report_for_config(args.config, fidelity=not args.no_fidelity)
    except ValueError as err:
        _parser().error(str(err))
    print(report.to_json() if args.json else report.table())
    return 0
