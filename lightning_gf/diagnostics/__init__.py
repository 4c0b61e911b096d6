"""Diagnostics: gradient fidelity, the per-layer report, what autograd keeps (meters, the step
profiler, plain backprop's memory) and the step's peak. Imports ``lightning_gf.surgery`` and below."""

from lightning_gf.diagnostics.fidelity import (
    FidelityResult,
    LayerFidelity,
    fidelity_with_handle,
    gradient_fidelity,
    training_step_loss,
)
from lightning_gf.diagnostics.report import LayerReport, layer_report, probe_loss

__all__ = [
    "FidelityResult",
    "LayerFidelity",
    "LayerReport",
    "fidelity_with_handle",
    "gradient_fidelity",
    "layer_report",
    "probe_loss",
    "training_step_loss",
]
