"""Every recipe runs ``fit --trainer.fast_dev_run=true`` through the console script's entry
function, and each gradient-filtering recipe's vanilla twin trains exactly the same set."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import lightning_gf.callbacks.base as callback_base
from lightning_gf.app.cli import build_cli

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
GF_RECIPES = sorted(p.name for p in RECIPES.glob("*_gf.yaml"))
# the smallest images at which each recipe keeps its layer selection (maps >= r x r)
_APPLY = callback_base.apply_gradient_filter
TINY = {"classification": 64, "segmentation": 96}


def _tiny_args(recipe: Path) -> list[str]:
    task = yaml.safe_load(recipe.read_text())["data"]["init_args"]["task"]
    return [
        f"--data.init_args.image_size={TINY[task]}",
        "--data.init_args.train_size=2",
        "--data.init_args.val_size=2",
        "--data.init_args.batch_size=2",
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def _fit(recipe: Path, monkeypatch: pytest.MonkeyPatch, root: Path) -> tuple[dict, dict]:
    """Run the recipe; return the filter it installed and the metrics it logged."""
    seen = {}

    def spy(model, *args, **kwargs):
        handle = _APPLY(model, *args, **kwargs)
        seen["layers"] = {layer.name: layer.r for layer in handle.layers}
        seen["frozen"] = set(handle.frozen_parameters)
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return handle

    monkeypatch.setattr(callback_base, "apply_gradient_filter", spy)
    cli = build_cli(["fit", f"--config={recipe}", *_tiny_args(recipe), f"--trainer.default_root_dir={root}"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return seen, metrics


def test_every_recipe_has_a_twin() -> None:
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert len(GF_RECIPES) == 16
    assert names == set(GF_RECIPES) | {n.replace("_gf.yaml", "_bp.yaml") for n in GF_RECIPES}


@pytest.mark.parametrize("name", GF_RECIPES)
def test_recipe_and_twin_fit(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gf_recipe, bp_recipe = RECIPES / name, RECIPES / name.replace("_gf.yaml", "_bp.yaml")
    gf, gf_metrics = _fit(gf_recipe, monkeypatch, tmp_path / "gf")
    bp, bp_metrics = _fit(bp_recipe, monkeypatch, tmp_path / "bp")

    # the twin differs only in r: same layers, same frozen part, same trainable set
    gf_cfg, bp_cfg = yaml.safe_load(gf_recipe.read_text()), yaml.safe_load(bp_recipe.read_text())
    gf_cb, bp_cb = gf_cfg["trainer"]["callbacks"][0]["init_args"], bp_cfg["trainer"]["callbacks"][0]["init_args"]
    assert {k: v for k, v in gf_cb.items() if k != "r"} == {k: v for k, v in bp_cb.items() if k != "r"}
    assert {k: v for k, v in gf_cfg.items() if k != "trainer"} == {k: v for k, v in bp_cfg.items() if k != "trainer"}
    assert set(gf["layers"]) == set(bp["layers"]) and len(gf["layers"]) == gf_cb["depth"]
    assert gf["frozen"] == bp["frozen"] and gf["trainable"] == bp["trainable"]
    assert set(bp["layers"].values()) == {1} and max(gf["layers"].values()) > 1

    # both trained one step; the filtered layers kept less for backward than the same layers in the twin
    for metrics in (gf_metrics, bp_metrics):
        assert metrics["train/loss"] > 0 and "val/loss" in metrics
    assert bp_metrics["gf/activation_mb"] == pytest.approx(bp_metrics["gf/activation_mb_vanilla"])
    assert gf_metrics["gf/activation_mb_vanilla"] == pytest.approx(bp_metrics["gf/activation_mb"])
    assert gf_metrics["gf/activation_mb"] < 0.6 * bp_metrics["gf/activation_mb"]
