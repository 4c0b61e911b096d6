"""``lightning-gf report --config``: the per-layer report of a recipe, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_gf.app.cli import main

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _tiny(tmp_path: Path, task: str) -> Path:
    path = tmp_path / "tiny.yaml"
    size = 64 if task == "classification" else 64
    path.write_text(yaml.safe_dump({"data": {"init_args": {"image_size": size, "train_size": 2, "val_size": 2,
                                                            "batch_size": 2}}}))
    return path


def test_report_of_a_recipe_as_json(tmp_path, capsys):
    recipe = RECIPES / "resnet18_4L_gf.yaml"
    cfg = yaml.safe_load(recipe.read_text())
    cb = cfg["trainer"]["callbacks"][0]["init_args"]
    with pytest.raises(SystemExit) as done:
        main(["report", "--config", str(recipe), "--config", str(_tiny(tmp_path, "classification")), "--json"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["layers"]
    assert len(rows) == cb["depth"]
    assert all(row["name"].startswith("model.") for row in rows)
    assert all(row["r"] == cb["r"] for row in rows)
    for row in rows:
        assert 0 < row["kept_bytes_filtered"] < row["kept_bytes_vanilla"]
        assert 0 < row["backward_macs_filtered"] < row["backward_macs_vanilla"]
        assert row["gw_cos"] is None or -1.0 <= row["gw_cos"] <= 1.0
    for key in ("kept_bytes_vanilla", "kept_bytes_filtered", "backward_macs_vanilla", "backward_macs_filtered"):
        assert report["totals"][key] == sum(row[key] for row in rows)
    assert report["totals"]["graph_kept_bytes_filtered"] < report["totals"]["graph_kept_bytes_vanilla"]
    assert report["config"]["configs"][0].endswith("resnet18_4L_gf.yaml")


def test_report_without_the_callback_is_refused(tmp_path, capsys):
    bare = tmp_path / "bare.yaml"
    cfg = yaml.safe_load((RECIPES / "resnet18_2L_gf.yaml").read_text())
    cfg["trainer"].pop("callbacks")
    bare.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["report", "--config", str(bare), "--config", str(_tiny(tmp_path, "classification"))])
    assert done.value.code == 2
    assert "no GradientFilterCallback" in capsys.readouterr().err
