"""The package's layers: imports point down only (app -> callbacks -> diagnostics -> surgery ->
ops -> backends; ``lightning_gf.config`` from anywhere, importing nothing of the package)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_gf"
LAYERS = ["backends", "ops", "surgery", "diagnostics", "callbacks", "app"]
# The public paths kept from before the layers: re-exports only, above every layer.
FACADE = {"lightning_gf", "lightning_gf.__main__", "lightning_gf.functional", "lightning_gf.callback",
          "lightning_gf.lightning", "lightning_gf.models", "lightning_gf.data"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "lightning_gf":
        return None
    if len(parts) > 1 and parts[1] == "config":
        return "config"
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "facade"


def imports_of(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of ``lightning_gf``, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lightning_gf":  # from lightning_gf import config / backends / ...
                found += [(node.lineno, f"lightning_gf.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, module) for line, module in found if module.split(".")[0] == "lightning_gf"]


def violations(module: str, source: str) -> list[str]:
    own = layer_of(module)
    if own == "facade":
        return []
    wrong = []
    for line, target in imports_of(source):
        layer = layer_of(target)
        if layer == "config":
            ok = True
        elif own == "config" or layer == "facade":
            ok = False
        else:
            ok = LAYERS.index(layer) <= LAYERS.index(own)
        if not ok:
            wrong.append(f"{module}:{line} ({own}) imports {target} ({layer})")
    return wrong


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def test_every_import_of_the_package_points_down():
    wrong = [v for module, path in _modules() for v in violations(module, path.read_text())]
    assert wrong == []


def test_every_module_belongs_to_a_layer_or_the_facade():
    unplaced = [module for module, _ in _modules() if layer_of(module) == "facade" and module not in FACADE]
    assert unplaced == []


@pytest.mark.parametrize("module,source,bad", [
    ("lightning_gf.ops.conv", "from lightning_gf.surgery.handle import GradientFilterHandle", True),
    ("lightning_gf.backends.cpu", "from lightning_gf import config", False),
    ("lightning_gf.backends.cpu", "from lightning_gf.ops import patch_grid", True),
    ("lightning_gf.surgery.apply", "def f():\n    from lightning_gf.callbacks.base import X", True),
    ("lightning_gf.diagnostics.report", "import lightning_gf", True),
    ("lightning_gf.config", "from lightning_gf.ops.conv import filtered_conv2d", True),
    ("lightning_gf.backends.small_maps", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from lightning_gf.ops.patch_grid import AxisGrid", False),
    ("lightning_gf.app.cli", "from lightning_gf.callbacks.pytorch_lightning import GradientFilterCallback", False),
])
def test_the_check_sees_an_upward_import(module, source, bad):
    assert bool(violations(module, source)) == bad


def test_the_public_paths_of_before_the_layers_still_import_the_same_objects():
    import lightning_gf
    import lightning_gf.callback as pl_callback
    import lightning_gf.data as data
    import lightning_gf.functional as functional
    import lightning_gf.lightning as l_callback
    import lightning_gf.models as models
    from lightning_gf.app import data as app_data
    from lightning_gf.app import models as app_models
    from lightning_gf.callbacks import lightning, pytorch_lightning
    from lightning_gf.ops import conv
    from lightning_gf.surgery import apply, handle

    assert lightning_gf.filtered_conv2d is functional.filtered_conv2d is conv.filtered_conv2d
    assert lightning_gf.apply_gradient_filter is apply.apply_gradient_filter
    assert lightning_gf.GradientFilterHandle is handle.GradientFilterHandle
    assert lightning_gf.GradientFilterCallback is pl_callback.GradientFilterCallback
    assert pl_callback.GradientFilterCallback is pytorch_lightning.GradientFilterCallback
    assert l_callback.GradientFilterCallback is lightning.GradientFilterCallback
    for name in app_models.__all__:
        assert getattr(models, name) is getattr(app_models, name)
    for name in app_data.__all__:
        assert getattr(data, name) is getattr(app_data, name)
    assert {"FilterStats", "FilteredLayer"} <= set(lightning_gf.__all__)


def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    wrong = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith("tests.") and n.split(".")[-1].startswith("test_") for n in names):
                wrong.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert wrong == []
