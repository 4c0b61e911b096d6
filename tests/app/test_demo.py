"""The demo, in its reduced mode: both runs, the table, the plots, the cached checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_gf.app.demo import DemoConfig, main, run_demo


def test_demo_quick_classification(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = DemoConfig.quick()
    results = run_demo(cfg, str(tmp_path))
    out = capsys.readouterr().out
    assert "pretraining" in out and "reusing" not in out
    vanilla, filtered = results["runs"]["vanilla backprop"], results["runs"]["gradient filter r=2"]
    n_steps = cfg.finetune_epochs * (cfg.finetune_size // cfg.batch_size)
    assert len(vanilla["steps"]) == len(filtered["steps"]) == n_steps
    v, f = vanilla["summary"], filtered["summary"]
    # measured over the whole graph, and as logged by the callback: filtering keeps less for backward
    assert 0 < f["kept_mb"] < v["kept_mb"]
    assert 0 < f["gf_activation_mb"] < 0.6 * v["gf_activation_mb"]
    assert 0 <= f["metric"] <= 1 and 0 <= v["metric"] <= 1
    assert all(s["backward_s"] > 0 and s["step_s"] > s["backward_s"] for s in filtered["steps"])
    for name in ("memory_per_step.png", "loss_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["table"] == results["table"]
    assert results["table"].count("\n| ") == 2 and "| vanilla backprop |" in out

    # a second run reuses the pretrained checkpoint cached in the output folder
    main(["--quick", "--out", str(tmp_path)])
    assert "reusing the pretrained checkpoint" in capsys.readouterr().out


def test_demo_quick_segmentation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = run_demo(DemoConfig.quick("segmentation"), str(tmp_path))
    v, f = (results["runs"][k]["summary"] for k in ("vanilla backprop", "gradient filter r=2"))
    assert 0 < f["kept_mb"] < v["kept_mb"] and 0 <= f["metric"] <= 1
    assert "mIoU" in capsys.readouterr().out


def test_demo_no_lean_keeps_more_and_leaves_vanilla_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lean = run_demo(DemoConfig.quick(), str(tmp_path))
    main(["--quick", "--no-lean", "--out", str(tmp_path)])
    assert "lean off" in capsys.readouterr().out
    plain = json.loads((tmp_path / "results.json").read_text())
    assert lean["config"]["lean"] is True and plain["config"]["lean"] is False
    name = "gradient filter r=2"
    # without the lean region, BatchNorm/ReLU after the filtered convs keep full-size tensors
    assert plain["runs"][name]["summary"]["kept_mb"] > lean["runs"][name]["summary"]["kept_mb"]
    # the filtered convs themselves keep the same pooled inputs either way
    assert plain["runs"][name]["summary"]["gf_activation_mb"] == pytest.approx(
        lean["runs"][name]["summary"]["gf_activation_mb"])
    # lean is a property of the filter: the vanilla run (r = 1) is the same run
    assert plain["runs"]["vanilla backprop"]["summary"]["metric"] == lean["runs"]["vanilla backprop"]["summary"]["metric"]
