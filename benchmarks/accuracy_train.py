"""Training loops of the accuracy benchmark: pretrain a whole timm model, then fine-tune
its last ``depth`` convs with plain backprop or gradient filtering.

Plain PyTorch (no Lightning) for many short runs. Fine-tuning follows the paper: the
front of the network is frozen, BatchNorm stays in eval mode, SGD with a cosine schedule
and gradient clipping at 2.0. Because the frozen front is deterministic (eval mode, no
augmentation of the cached images), its output is computed once per image and cached:
each run trains only the tail of the network, from the block that holds the first
trained conv. The tail with the cached features computes exactly what the whole model
would (checked on every split, and in the tests).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.accuracy_data import DataSource, Tensors
from lightning_gf import apply_gradient_filter
from lightning_gf.app.models.optim import warmup_cosine

CLIP_NORM = 2.0


def build_model(name: str, num_classes: int) -> nn.Module:
    """A randomly initialised timm model (nothing is downloaded)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def sequential_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as a flat list of ``(name, module)`` that, applied in order, is its forward.

    Top-level children in registration order, with every ``nn.Sequential`` expanded into its
    children (timm ResNet: stem, then the blocks of ``layer1..4``, pool, ``fc``; timm
    EfficientNet/MobileNetV2: stem, the blocks of every stage, head). Holds for timm models
    whose ``forward`` is their children in order (``drop_rate=0``); :func:`split_at` checks it.
    """

    def expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        if isinstance(module, nn.Sequential):
            return [unit for name, child in module.named_children() for unit in expand(f"{prefix}.{name}", child)]
        return [(prefix, module)]

    return [unit for name, child in model.named_children() for unit in expand(name, child)]


@dataclass
class SplitModel:
    """``front`` (frozen, run once per image) and ``tail`` (trained) of a model: ``tail(front(x)) == model(x)``."""

    front: nn.Sequential
    tail: nn.Sequential
    trained: list[str]  # names in the whole model of the convs that fine-tuning trains
    strided: bool  # whether any trained conv has a stride > 1 (else both conventions coincide)


def _sequential(units: list[tuple[str, nn.Module]]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module in units))


def split_at(model: nn.Module, depth: int, example: Tensor) -> SplitModel:
    """Split ``model`` before the block holding the first of its last ``depth`` convs.

    Example:
        >>> model = build_model("resnet18", 8).eval()
        >>> split = split_at(model, 2, torch.zeros(1, 3, 64, 64))
        >>> split.trained, split.strided
        (['layer4.1.conv1', 'layer4.1.conv2'], False)
    """
    handle = apply_gradient_filter(model, r=1, depth=depth, example_input=example, lean=False)
    trained = [layer.name for layer in handle.layers]
    strided = any(tuple(layer.module.stride) != (1, 1) for layer in handle.layers)
    handle.remove()
    units = sequential_units(model)
    first = next(i for i, (name, _) in enumerate(units) if trained[0] == name or trained[0].startswith(name + "."))
    split = SplitModel(_sequential(units[:first]), _sequential(units[first:]), trained, strided)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if not torch.allclose(split.tail(split.front(example)), model(example), rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{type(model).__name__} is not the sequence of its children: cannot cache its front")
    model.train(was_training)
    return split


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def run_batched(module: nn.Module, images: Tensor, batch_size: int = 64) -> Tensor:
    """``module(images)`` in eval mode, ``batch_size`` images at a time, on the module's device."""
    module.eval()
    device = device_of(module)
    return torch.cat([module(images[i:i + batch_size].to(device)) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def accuracy(module: nn.Module, data: Tensors, batch_size: int = 128) -> float:
    """Top-1 accuracy (%) of ``module`` (eval mode) on ``data``."""
    logits = run_batched(module, data.images, batch_size)
    return 100.0 * float((logits.argmax(1).cpu() == data.labels.cpu()).float().mean())


def _schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(warmup_ratio * steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, steps, warmup))


def _sgd_step(loss: Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
    optimizer.step()


def pretrain(model: nn.Module, source: DataSource, *, phases: list[tuple[int, int]], batch_size: int, lr: float,
             seed: int, log_every: int = 20, prefix: str = "") -> None:
    """Train the whole network (BatchNorm in train mode) on the pretraining partition:
    ``phases`` of ``(steps, image_size)`` (progressive resizing: small images first, cheaper),
    AdamW, warm-up then cosine over all steps, gradient clipping 2.0."""
    torch.manual_seed(seed)
    model.train()
    device = device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    total = sum(steps for steps, _ in phases)
    schedule = _schedule(optimizer, total, 0.1)
    start, step = time.perf_counter(), 0
    for phase, (steps, size) in enumerate(phases):
        for batch in source.pretrain_batches(steps, batch_size, seed + phase, size):
            loss = F.cross_entropy(model(batch.images.to(device)), batch.labels.to(device))
            _sgd_step(loss, params, optimizer)
            schedule.step()
            step += 1
            if step % log_every == 0 or step == total:
                print(f"{prefix}pretrain step {step}/{total} ({size} px) loss {loss.item():.3f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run: ``r = 1`` is plain backprop of the same layers."""

    depth: int
    r: int
    stride_correction: bool
    seed: int
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    warmup_ratio: float = 0.1
    lean: bool = True


def finetune(tail: nn.Module, train: Tensors, val: Tensors, cfg: FinetuneConfig) -> dict[str, float]:
    """Fine-tune a copy of ``tail`` (fed cached front features) and score it on ``val``.

    Returns ``{"acc": top-1 %, "seconds": wall time, "steps": optimiser steps}``.
    """
    start = time.perf_counter()
    tail = copy.deepcopy(tail)
    device = device_of(tail)
    train = Tensors(train.images.to(device), train.labels.to(device))
    handle = apply_gradient_filter(tail, r=cfg.r, depth=cfg.depth, example_input=train.images[:2],
                                   stride_correction=cfg.stride_correction, lean=cfg.lean)
    params = [p for p in tail.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    schedule = _schedule(optimizer, cfg.epochs * steps_per_epoch, cfg.warmup_ratio)
    order = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tail.train()  # BatchNorm stays in eval mode: apply_gradient_filter's bn_eval
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=order)
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(tail(train.images[idx]), train.labels[idx])
            _sgd_step(loss, params, optimizer)
            schedule.step()
    acc = accuracy(tail, val)
    handle.remove()
    return {"acc": acc, "seconds": time.perf_counter() - start, "steps": cfg.epochs * steps_per_epoch}


def front_features(front: nn.Module, sets: Iterable[Tensors], batch_size: int = 64) -> list[Tensors]:
    """Each set with its images replaced by the output of ``front`` (frozen, eval mode)."""
    return [Tensors(run_batched(front, s.images, batch_size), s.labels) for s in sets]
