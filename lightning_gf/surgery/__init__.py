"""Model surgery: find the layers (tracing), swap their classes, and the handle that undoes it.

Works on any ``nn.Module``; imports ``lightning_gf.ops`` and below only.
"""

from lightning_gf.surgery.apply import RSpec, apply_gradient_filter
from lightning_gf.surgery.handle import FilteredLayer, GradientFilterHandle

__all__ = ["FilteredLayer", "GradientFilterHandle", "RSpec", "apply_gradient_filter"]
