"""End to end: what the autograd graph keeps, step time and backward time, per model.

Three ways to fine-tune the same last ``depth`` convs (same frozen part, BatchNorm in
eval mode, same trainable set):

- ``vanilla``: plain backprop (``handle.plain()``);
- ``filter``: the filtered convs alone (``lean=False``), the paper's "plain swap";
- ``lean``: the filtered convs and the lean trained region (the default).

"Kept" is the sum of the distinct storages that autograd saves for backward during the
model's forward (parameters and buffers excluded): what the graph really keeps when
forward ends. Run: ``.venv/bin/python -m benchmarks.models [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from benchmarks.timing import median_ms
from lightning_gf import apply_gradient_filter
from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter

MIB = 2**20


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    depth: int
    size: int
    batch: int


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _smp(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=21)

    return build


MODELS = [
    ModelSpec("timm mobilenetv2_100", _timm("mobilenetv2_100"), 4, 224, 8),
    ModelSpec("timm resnet18", _timm("resnet18"), 4, 224, 8),
    ModelSpec("timm resnet34", _timm("resnet34"), 4, 224, 8),
    ModelSpec("timm efficientnet_b0", _timm("efficientnet_b0"), 4, 224, 8),
    ModelSpec("smp DeepLabV3-resnet18", _smp("DeepLabV3"), 10, 512, 2),
    ModelSpec("smp UPerNet-resnet18", _smp("UPerNet"), 10, 512, 2),
]


def kept_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves during ``model(x)``, and the output."""
    meter = SavedTensorMeter()
    meter.skip_parameters_of(model, buffers=True)
    with meter:
        out = model(x)
    return meter.total_bytes, out


def _loss(out) -> torch.Tensor:
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float().pow(2).mean()


def bench_model(spec: ModelSpec, r: int, repeats: int, batch: int | None = None, size: int | None = None) -> dict:
    torch.manual_seed(0)
    net = spec.build()
    batch = batch or spec.batch
    size = size or spec.size
    x = torch.randn(batch, 3, size, size)
    variants = {}
    for variant in ("vanilla", "filter", "lean"):
        model = copy.deepcopy(net)
        handle = apply_gradient_filter(model, r=r, depth=spec.depth, example_input=x[:1], lean=variant == "lean")
        model.train()
        plain = handle.plain() if variant == "vanilla" else nullcontext()
        with plain:
            kept, out = kept_bytes(model, x)
            del out
        variants[variant] = (model, handle, kept)

    def step(variant: str) -> Callable[[], None]:
        model, handle, _ = variants[variant]

        def run() -> None:
            with handle.plain() if variant == "vanilla" else nullcontext():
                loss = _loss(model(x))
                loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    def backward_only(variant: str) -> Callable[[], None]:
        model, handle, _ = variants[variant]
        with handle.plain() if variant == "vanilla" else nullcontext():
            loss = _loss(model(x))
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> None:
            torch.autograd.grad(loss, params, retain_graph=True)

        return run

    step_ms = median_ms({v: step(v) for v in variants}, repeats)
    backward_ms = median_ms({v: backward_only(v) for v in variants}, repeats)
    row = {"model": spec.name, "depth": spec.depth, "size": size, "batch": batch, "r": r}
    for v, (_, _, kept) in variants.items():
        row[f"kept_mib_{v}"] = kept / MIB
        row[f"step_ms_{v}"] = step_ms[v]
        row[f"backward_ms_{v}"] = backward_ms[v]
    for v in ("filter", "lean"):
        row[f"kept_change_{v}"] = row[f"kept_mib_{v}"] / row["kept_mib_vanilla"] - 1
    return row


def max_batch_in_budget(row: dict, budget_mib: float) -> dict:
    """Largest batch whose graph-kept memory fits ``budget_mib``, from the measured per-sample figure."""
    return {v: int(budget_mib // (row[f"kept_mib_{v}"] / row["batch"])) for v in ("vanilla", "filter", "lean")}


def run(r: int = 2, repeats: int = 3, quick: bool = False) -> list[dict]:
    rows = []
    for spec in MODELS:
        kwargs = dict(batch=2, size=96 if spec.size == 224 else 128) if quick else {}
        row = bench_model(spec, r, 1 if quick else repeats, **kwargs)
        rows.append(row)
        print(
            f"{spec.name:26s} kept {row['kept_mib_vanilla']:7.1f} -> filter {row['kept_mib_filter']:7.1f} "
            f"({row['kept_change_filter']:+.0%}) -> lean {row['kept_mib_lean']:7.1f} ({row['kept_change_lean']:+.0%}) MiB | "
            f"step {row['step_ms_vanilla']:.0f}/{row['step_ms_filter']:.0f}/{row['step_ms_lean']:.0f} ms | "
            f"bwd {row['backward_ms_vanilla']:.0f}/{row['backward_ms_filter']:.0f}/{row['backward_ms_lean']:.0f} ms",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(quick=args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
