"""``python -m lightning_gf.app.report --model timm:resnet18 ...``: the per-layer report
(:func:`lightning_gf.diagnostics.layer_report`) of a model built by name, on a random input."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch

from lightning_gf.app.model_spec import build_model
from lightning_gf.diagnostics.report import layer_report


def _input_size(text: str) -> tuple[int, ...]:
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"--input-size takes C,H,W (e.g. 3,224,224), got {text!r}")
    return size


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--model-kwargs takes a JSON object, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_gf.app.report",
        description="Per-layer report of gradient filtering: memory kept, backward multiply-adds, g_w fidelity.",
    )
    p.add_argument("--model", required=True, help="timm:NAME, torchvision:NAME or package.module:callable")
    p.add_argument("--input-size", type=_input_size, default=(3, 224, 224), help="C,H,W (default 3,224,224)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--r", type=int, default=2, help="patch size (default 2)")
    p.add_argument("--depth", type=int, default=3, help="number of last conv layers to filter (default 3)")
    p.add_argument("--include", action="append", help="fnmatch pattern of convs that may be filtered (repeatable)")
    p.add_argument("--exclude", action="append", help="fnmatch pattern of convs never filtered (repeatable)")
    p.add_argument("--no-stride-correction", action="store_true", help="use the paper's convention")
    p.add_argument("--no-fidelity", action="store_true", help="skip the g_w cosine (faster)")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (timm/torchvision)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help='JSON object of extra model arguments, e.g. \'{"zero_init_last": false}\'')
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input and of the initial weights")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: builds the model and a random input, prints the report."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        _parser().error("--batch-size must be >= 1")
    print(f"building {args.model} ...", file=sys.stderr)
    torch.manual_seed(args.seed)  # random initial weights are reproducible too
    try:
        model = build_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, **args.model_kwargs)
    except ValueError as err:
        _parser().error(str(err))
    model = model.to(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch_size, *args.input_size, generator=gen).to(args.device)
    print("measuring vanilla and filtered passes" + ("" if args.no_fidelity else " and the fidelity")
          + " ...", file=sys.stderr)
    try:
        report = layer_report(
            model, x, args.r, args.depth, include=args.include, exclude=args.exclude,
            stride_correction=not args.no_stride_correction, fidelity=not args.no_fidelity,
        )
    except ValueError as err:
        _parser().error(str(err))
    report.config.update(model=args.model, input_size=list(args.input_size), batch_size=args.batch_size,
                         pretrained=args.pretrained, seed=args.seed)
    print(report.to_json() if args.json else report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
