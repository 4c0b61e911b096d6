"""The demo: vanilla backprop and gradient filtering side by side on the embedded data.

    python -m lightning_gf.app.demo                      # classification, timm test_resnet
    python -m lightning_gf.app.demo --task segmentation  # smp FPN over the same timm encoder
    python -m lightning_gf.app.demo --quick              # a reduced run (seconds), as the tests use
    python -m lightning_gf.app.demo --no-lean            # the filter without its lean trained region

1. Pretrains the whole network briefly on the ``pretrain`` split of the generated shapes
   (or reuses the checkpoint cached in the output folder).
2. Fine-tunes the last ``depth`` convs on the shifted ``finetune`` split twice from that
   checkpoint, same seed and data order: vanilla backprop (``GradientFilterCallback(r=1)``:
   same layers, same frozen part) and gradient filtering (``r``).
3. Prints a table (accuracy or mIoU, memory kept for backward, backward and step time)
   and writes ``memory_per_step.png``, ``loss_curves.png`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from lightning_gf.app.data.shapes_module import ShapesDataModule
from lightning_gf.app.models import ImageClassifier, SemanticSegmenter
from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback
from lightning_gf.diagnostics.step_profiler import StepProfiler, StepRecord


@dataclass(frozen=True)
class DemoConfig:
    """Everything a demo run depends on (the cached checkpoint's name includes the pretraining part)."""

    task: str = "classification"
    model: str = "test_resnet"
    arch: str = "FPN"
    image_size: int = 64
    pretrain_size: int = 4096
    pretrain_epochs: int = 5
    finetune_size: int = 1024
    finetune_epochs: int = 6
    val_size: int = 256
    batch_size: int = 32
    depth: int = 4
    r: int = 2
    seed: int = 0
    lean: bool = True  # the filter's lean trained region (False: plain filtered convs only)

    @classmethod
    def quick(cls, task: str = "classification") -> "DemoConfig":
        """A reduced run for tests: tiny images and data, one epoch each."""
        return cls(task=task, image_size=64, pretrain_size=32, pretrain_epochs=1, finetune_size=32,
                   finetune_epochs=1, val_size=16, batch_size=8, depth=2)

    @property
    def metric(self) -> str:
        return "val/acc" if self.task == "classification" else "val/miou"

    def checkpoint_name(self) -> str:
        name = self.model if self.task == "classification" else f"{self.arch}-{self.model}"
        return (f"pretrained_{self.task}_{name}_{self.image_size}px_{self.pretrain_size}x"
                f"{self.pretrain_epochs}_seed{self.seed}.pt")


@dataclass
class RunResult:
    name: str
    metric: float
    steps: list[StepRecord]

    def summary(self) -> dict[str, float]:
        steps = self.steps[1:] or self.steps  # the first step warms caches up
        return {
            "metric": self.metric,
            "kept_mb": statistics.median(s.kept_mb for s in steps),
            "gf_activation_mb": statistics.median(s.gf_activation_mb or 0.0 for s in steps),
            "backward_ms": 1000 * statistics.median(s.backward_s for s in steps),
            "step_ms": 1000 * statistics.median(s.step_s for s in steps),
        }


_SMALL_FPN = {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32}  # 3x faster than smp's default


def _module(cfg: DemoConfig, checkpoint: Optional[str], lr: float, optimizer: str) -> pl.LightningModule:
    if cfg.task == "classification":
        return ImageClassifier(cfg.model, num_classes=8, checkpoint_path=checkpoint, optimizer=optimizer, lr=lr,
                               momentum=0.9, warmup_ratio=0.1)
    return SemanticSegmenter(cfg.arch, f"tu-{cfg.model}", num_classes=9, checkpoint_path=checkpoint, optimizer=optimizer,
                             lr=lr, momentum=0.9, warmup_ratio=0.1, model_kwargs=_SMALL_FPN if cfg.arch == "FPN" else None)


def _data(cfg: DemoConfig, split: str, size: int) -> ShapesDataModule:
    return ShapesDataModule(task=cfg.task, split=split, image_size=cfg.image_size, train_size=size,
                            val_size=cfg.val_size, test_size=cfg.val_size, batch_size=cfg.batch_size, seed=cfg.seed)


def _trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, gradient_clip_val=2.0, accelerator="cpu", devices=1,
                      num_sanity_val_steps=0, deterministic=False)


def pretrain(cfg: DemoConfig, out: str) -> str:
    """Train the whole network on the pretraining split, or reuse the cached checkpoint."""
    path = os.path.join(out, cfg.checkpoint_name())
    if os.path.isfile(path):
        print(f"[1/3] reusing the pretrained checkpoint {path}")
        return path
    print(f"[1/3] pretraining {cfg.model} on the 'pretrain' split ({cfg.pretrain_size} images, "
          f"{cfg.pretrain_epochs} epochs); cached as {path}")
    pl.seed_everything(cfg.seed, verbose=False)
    module = _module(cfg, None, lr=3e-3, optimizer="adamw")
    trainer = _trainer(cfg.pretrain_epochs, [])
    trainer.fit(module, datamodule=_data(cfg, "pretrain", cfg.pretrain_size))
    print(f"      pretraining {cfg.metric} = {float(trainer.callback_metrics[cfg.metric]):.3f}")
    torch.save(module.model.state_dict(), path)
    return path


def finetune(cfg: DemoConfig, checkpoint: str, r: int, name: str) -> RunResult:
    """Fine-tune the last ``cfg.depth`` convs with patch size ``r`` (1 = vanilla backprop)."""
    pl.seed_everything(cfg.seed, verbose=False)
    module = _module(cfg, checkpoint, lr=0.05 if cfg.task == "classification" else 0.01, optimizer="sgd")
    profiler = StepProfiler()
    trainer = _trainer(cfg.finetune_epochs, [GradientFilterCallback(r=r, depth=cfg.depth, lean=cfg.lean), profiler])
    data = _data(cfg, "finetune", cfg.finetune_size)
    trainer.fit(module, datamodule=data)
    metric = float(trainer.validate(module, datamodule=data, verbose=False)[0][cfg.metric])
    return RunResult(name, metric, profiler.steps)


def before_finetuning(cfg: DemoConfig, checkpoint: str) -> float:
    """The pretrained network's score on the fine-tuning split's validation set."""
    module = _module(cfg, checkpoint, lr=0.01, optimizer="sgd")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, accelerator="cpu", devices=1)
    return float(trainer.validate(module, datamodule=_data(cfg, "finetune", 1), verbose=False)[0][cfg.metric])


def _table(cfg: DemoConfig, results: list[RunResult]) -> str:
    metric = "accuracy" if cfg.task == "classification" else "mIoU"
    header = (f"| run | {metric} | kept for backward, whole graph (gf/activation_mb, MiB) | kept by the "
              f"{cfg.depth} trained convs (MiB) | backward (ms) | step (ms) |")
    rows = [header, "|---|---|---|---|---|---|"]
    for res in results:
        s = res.summary()
        rows.append(f"| {res.name} | {s['metric']:.3f} | {s['kept_mb']:.2f} | {s['gf_activation_mb']:.2f} | "
                    f"{s['backward_ms']:.1f} | {s['step_ms']:.1f} |")
    return "\n".join(rows)


def _plots(results: list[RunResult], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, ylabel, filename in (("kept_mb", "memory kept for backward (MiB)", "memory_per_step.png"),
                                  ("loss", "training loss", "loss_curves.png")):
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for i, res in enumerate(results):
            colour = f"C{i}"
            label = f"{res.name}, whole graph (measured)" if key == "kept_mb" else res.name
            ax.plot([getattr(s, key) for s in res.steps], color=colour, label=label)
            if key == "kept_mb":
                ax.plot([s.gf_activation_mb or 0.0 for s in res.steps], color=colour, linestyle="--",
                        label=f"{res.name}, trained convs (measured)")
        if key == "kept_mb":
            ax.set_ylim(bottom=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, filename)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run_demo(cfg: DemoConfig, out: str) -> dict[str, Any]:
    """Pretrain (or reuse), fine-tune vanilla and filtered, print the table, write plots and JSON.

    Example:
        >>> DemoConfig.quick().depth
        2
    """
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    checkpoint = pretrain(cfg, out)
    before = before_finetuning(cfg, checkpoint)
    runs = []
    for step, (r, name) in enumerate(((1, "vanilla backprop"), (cfg.r, f"gradient filter r={cfg.r}")), start=2):
        print(f"[{step}/3] fine-tuning the last {cfg.depth} convs on the 'finetune' split: {name}")
        runs.append(finetune(cfg, checkpoint, r, name))
    table = _table(cfg, runs)
    plots = _plots(runs, out)
    seconds = time.perf_counter() - start
    results = {"config": asdict(cfg), "seconds": seconds, "table": table, "before_finetuning": before,
               "runs": {res.name: {"summary": res.summary(), "steps": [asdict(s) for s in res.steps]} for res in runs}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{cfg.task}, {cfg.model}{'' if cfg.task == 'classification' else ' ' + cfg.arch}, "
          f"{cfg.image_size}px, batch {cfg.batch_size}, last {cfg.depth} convs, lean {'on' if cfg.lean else 'off'}, "
          f"medians over steps:\n{table}")
    print(f"(the pretrained network before fine-tuning: {'accuracy' if cfg.task == 'classification' else 'mIoU'} "
          f"{before:.3f} on the same validation set)")
    print(f"\nplots: {', '.join(plots)}\nresults: {os.path.join(out, 'results.json')}  ({seconds:.0f} s)")
    return results


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_gf.app.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (plots, results, cached checkpoint)")
    parser.add_argument("--task", choices=("classification", "segmentation"), default="classification")
    parser.add_argument("--quick", action="store_true", help="reduced run (tiny data, one epoch): seconds")
    parser.add_argument("--depth", type=int, help="number of last convs to fine-tune")
    parser.add_argument("--r", type=int, help="patch size of the gradient filter")
    parser.add_argument("--no-lean", dest="lean", action="store_false",
                        help="filter the convs only: BatchNorm/ReLU in the trained region keep their full inputs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: fastest on a CPU shared with other jobs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DemoConfig.quick(args.task) if args.quick else DemoConfig(task=args.task)
    overrides = {k: v for k, v in (("depth", args.depth), ("r", args.r)) if v is not None}
    overrides["lean"] = args.lean
    if args.task == "segmentation" and not args.quick:
        overrides = {"depth": 5, "pretrain_size": 3072, "pretrain_epochs": 4, "finetune_epochs": 4, **overrides}
    cfg = DemoConfig(**{**asdict(cfg), **overrides})
    warnings.filterwarnings("ignore", message=".*modules? in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    run_demo(cfg, args.out)


if __name__ == "__main__":
    main()
