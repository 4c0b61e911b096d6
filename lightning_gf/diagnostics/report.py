"""Per-layer report of what gradient filtering does to a model: memory, work, fidelity.

Python: :func:`layer_report` (any ``nn.Module`` plus an example input). Command line
(:mod:`lightning_gf.app.report`)::

    python -m lightning_gf.app.report --model timm:resnet18 --input-size 3,224,224 --r 2 --depth 4 [--json]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_gf.config import GradientFilterConfig, resolve_config
from lightning_gf.diagnostics.fidelity import LossFn, fidelity_with_handle, format_table
from lightning_gf.diagnostics.model_state import model_state_kept
from lightning_gf.diagnostics.saved_tensors import SavedTensorMeter
from lightning_gf.surgery.apply import RSpec, apply_gradient_filter
from lightning_gf.surgery.class_swap import is_swapped
from lightning_gf.surgery.handle import GradientFilterHandle
from lightning_gf.surgery.tracing import call_model, tensors_in

_COUNTS = ("kept_bytes_vanilla", "kept_bytes_filtered", "backward_macs_vanilla", "backward_macs_filtered")


@dataclass(frozen=True)
class ReportRow:
    """One filtered conv.

    ``kept_bytes_*``: bytes of the tensors the conv itself saved for backward in one
    forward of the example input (measured; parameters not counted), as a plain conv
    and filtered. ``backward_macs_*``: multiply-adds of its backward (analytic, only
    the gradients training needs). ``gw_cos``/``gw_norm_ratio``: fidelity of its
    weight gradient (:mod:`lightning_gf.diagnostics.fidelity`), ``None`` if not computed.
    """

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    out_size: tuple[int, ...]
    r: int
    kept_bytes_vanilla: int
    kept_bytes_filtered: int
    backward_macs_vanilla: int
    backward_macs_filtered: int
    gw_cos: Optional[float]
    gw_norm_ratio: Optional[float]


@dataclass(frozen=True)
class LayerReport:
    """Rows in forward order, their totals, and the options used.

    ``totals`` holds the sums of the four counts over the rows, plus
    ``graph_kept_bytes_vanilla``/``graph_kept_bytes_filtered``: everything the whole
    model's autograd graph keeps for backward (every module, each storage once,
    parameters not counted). The per-layer counts show what filtering removes; the
    graph totals show what is left once BatchNorm, activations and the rest are counted.
    """

    rows: list[ReportRow]
    totals: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "layers": [asdict(row) for row in self.rows], "totals": self.totals}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def table(self) -> str:
        """A plain-text table with a totals row and the whole-graph memory underneath."""
        header = ("layer", "kernel", "stride", "groups", "out", "r", "kept vanilla", "kept filtered",
                  "bwd MMAC vanilla", "bwd MMAC filtered", "g_w cos", "g_w ratio")
        rows = [
            (
                row.name,
                "x".join(map(str, row.kernel)),
                "x".join(map(str, row.stride)),
                str(row.groups),
                "x".join(map(str, row.out_size)),
                str(row.r),
                _size(row.kept_bytes_vanilla),
                _size(row.kept_bytes_filtered),
                _mmac(row.backward_macs_vanilla),
                _mmac(row.backward_macs_filtered),
                "-" if row.gw_cos is None else f"{row.gw_cos:.4f}",
                "-" if row.gw_norm_ratio is None else f"{row.gw_norm_ratio:.3f}",
            )
            for row in self.rows
        ]
        t = self.totals
        rows.append(("total", "", "", "", "", "", _size(t["kept_bytes_vanilla"]), _size(t["kept_bytes_filtered"]),
                     _mmac(t["backward_macs_vanilla"]), _mmac(t["backward_macs_filtered"]), "", ""))
        graph = (
            f"whole autograd graph keeps {_size(t['graph_kept_bytes_vanilla'])} (vanilla) -> "
            f"{_size(t['graph_kept_bytes_filtered'])} (filtered)"
        )
        notes = [graph]
        if any(row.gw_cos is None for row in self.rows) and self.config.get("fidelity", True):
            notes.append("g_w cos '-': the exact g_w is zero (e.g. a zero-initialised BatchNorm after the layer)")
        return "\n".join([format_table(header, rows), *notes])

    def __str__(self) -> str:
        return self.table()


def _size(n: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _mmac(n: int) -> str:
    return f"{n / 1e6:.2f}"


def probe_loss(model: nn.Module, batch: Any) -> Tensor:
    """``sum(output * noise)`` with fixed Gaussian noise (seed 0): a label-free loss whose
    output gradient is a generic direction. The default ``loss_fn`` of :func:`layer_report`.

    Example:
        >>> float(probe_loss(nn.Identity(), torch.ones(3))) == float(torch.randn(3, generator=torch.Generator().manual_seed(0)).sum())
        True
    """
    gen = torch.Generator().manual_seed(0)
    total: Optional[Tensor] = None
    for t in tensors_in(call_model(model, batch)):
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen).to(t.device)
            term = (t.float() * noise).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("probe_loss: the model returned no floating-point tensor; pass loss_fn=...")
    return total


def _measure(
    model: nn.Module, example_input: Any, handle: GradientFilterHandle, *, vanilla: bool
) -> tuple[dict[str, int], int, list[tuple[int, int]]]:
    """One forward with grad: bytes each layer saved, bytes the whole graph saved, and the
    (vanilla, filtered) backward multiply-adds of each layer."""
    modules = [layer.module for layer in handle.layers]
    handle.reset_stats()
    try:
        meter = SavedTensorMeter([(layer.name, layer.module) for layer in handle.layers])
        meter.skip_parameters_of(model)
        with torch.enable_grad(), meter, (handle.plain() if vanilla else nullcontext()):
            out = call_model(model, example_input)
        del out
        stats = [(m.gf_stats.backward_macs_vanilla, m.gf_stats.backward_macs_filtered) for m in modules]  # type: ignore[attr-defined]
    finally:
        handle.reset_stats()
    return meter.layer_bytes, meter.total_bytes, stats


def layer_report(
    model: nn.Module,
    example_input: Any,
    r: RSpec = 2,
    depth: int = 3,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    stride_correction: bool = True,
    freeze: bool = True,
    bn_eval: bool = True,
    lean: bool = True,
    loss_fn: Optional[LossFn] = None,
    batch: Any = None,
    fidelity: bool = True,
    train: bool = True,
    config: Optional[GradientFilterConfig] = None,
) -> LayerReport:
    """Report, per filtered layer in forward order, its shape, memory, backward work and ``g_w`` fidelity.

    Installs the filter as :func:`lightning_gf.apply_gradient_filter` would (same
    options), runs ``example_input`` forward as plain convs and as filtered convs while
    recording what autograd saves, computes the fidelity with
    :func:`lightning_gf.diagnostics.fidelity.fidelity_with_handle`, and leaves the model as it was.

    Args:
        model: any ``nn.Module``.
        example_input: a model input (tensor, tuple of arguments or dict of keyword arguments).
        r, depth, include, exclude, stride_correction, freeze, bn_eval, lean, config: as in
            :func:`lightning_gf.apply_gradient_filter`.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the fidelity; by default
            :func:`probe_loss` (a fixed random projection of the output).
        batch: what ``loss_fn`` takes; by default ``example_input``.
        fidelity: ``False`` skips the fidelity (``gw_cos`` is then ``None``).
        train: run in train mode (as in fine-tuning); ``False``: eval mode.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        >>> report = layer_report(net, torch.randn(1, 3, 8, 8), r=2, depth=1)
        >>> row = report.rows[0]
        >>> row.name, row.out_size, row.kept_bytes_vanilla, row.kept_bytes_filtered
        ('2', (4, 4), 2048, 128)
    """
    if any(is_swapped(m) for m in model.modules()):
        raise RuntimeError("this model already carries a gradient filter: remove it before asking for a report")
    config = resolve_config(config, r=r, depth=depth, include=include, exclude=exclude,
                            stride_correction=stride_correction, freeze=freeze, bn_eval=bn_eval, lean=lean)
    with model_state_kept(model):
        handle = apply_gradient_filter(model, config, example_input=example_input)
        try:
            model.train(train)
            bytes_v, graph_v, macs = _measure(model, example_input, handle, vanilla=True)
            bytes_f, graph_f, macs = _measure(model, example_input, handle, vanilla=False)
            fid = None
            if fidelity:
                fid = fidelity_with_handle(
                    model, example_input if batch is None else batch, loss_fn or probe_loss, handle, train=train
                ).as_dict()
            rows = []
            for layer, (mac_v, mac_f) in zip(handle.layers, macs):
                m = layer.module
                f = fid[layer.name] if fid is not None else {}
                rows.append(
                    ReportRow(
                        name=layer.name,
                        kernel=tuple(m.kernel_size),  # type: ignore[arg-type]
                        stride=tuple(m.stride),  # type: ignore[arg-type]
                        groups=m.groups,
                        out_size=tuple(layer.out_size),
                        r=layer.r,
                        kept_bytes_vanilla=bytes_v[layer.name],
                        kept_bytes_filtered=bytes_f[layer.name],
                        backward_macs_vanilla=mac_v,
                        backward_macs_filtered=mac_f,
                        gw_cos=f.get("gw_cos"),
                        gw_norm_ratio=f.get("gw_norm_ratio"),
                    )
                )
        finally:
            handle.remove()
    totals = {key: sum(getattr(row, key) for row in rows) for key in _COUNTS}
    totals["graph_kept_bytes_vanilla"] = graph_v
    totals["graph_kept_bytes_filtered"] = graph_f
    options = {**config.options(), "train": train, "fidelity": fidelity}
    return LayerReport(rows, totals, options)
