"""layer_report and `python -m lightning_gf.app.report`: numbers checked against values computed by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_gf.app.report import main
from lightning_gf.diagnostics.fidelity import gradient_fidelity
from lightning_gf.diagnostics.report import layer_report, probe_loss
from lightning_gf.surgery.class_swap import is_swapped

ROOT = Path(__file__).resolve().parents[2]
F32 = 4


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )


def test_layer_report_numbers_match_hand_computed_values():
    torch.manual_seed(0)
    net = _net()
    x = torch.randn(2, 3, 16, 16)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    report = layer_report(net, x, r=2, depth=2, lean=False)

    n, patches = 2, 4 * 4  # 8x8 output maps, 2x2 patches
    conv, point = report.rows
    assert (conv.name, conv.kernel, conv.stride, conv.groups, conv.out_size, conv.r) == ("3", (3, 3), (2, 2), 1, (8, 8), 2)
    assert (point.name, point.kernel, point.stride, point.out_size) == ("6", (1, 1), (1, 1), (8, 8))
    # kept for backward: the input as a plain conv, the pooled input when filtered
    assert conv.kept_bytes_vanilla == n * 8 * 16 * 16 * F32
    assert conv.kept_bytes_filtered == n * 8 * patches * F32
    assert point.kept_bytes_vanilla == n * 16 * 8 * 8 * F32
    assert point.kept_bytes_filtered == n * 16 * patches * F32
    # backward multiply-adds: layer "3" needs only g_w (all before it is frozen), "6" needs g_w and g_x
    assert conv.backward_macs_vanilla == n * 16 * 8 * 9 * 64
    assert conv.backward_macs_filtered == n * 16 * 8 * patches
    assert point.backward_macs_vanilla == 2 * n * 16 * 16 * 64
    assert point.backward_macs_filtered == 2 * n * 16 * 16 * patches
    # fidelity: the same as gradient_fidelity with the same loss
    expected = gradient_fidelity(net, x, probe_loss, r=2, depth=2).as_dict()
    for row in report.rows:
        assert row.gw_cos == pytest.approx(expected[row.name]["gw_cos"], abs=1e-9)
        assert row.gw_norm_ratio == pytest.approx(expected[row.name]["gw_norm_ratio"], rel=1e-9)
    totals = report.totals
    for key in ("kept_bytes_vanilla", "kept_bytes_filtered", "backward_macs_vanilla", "backward_macs_filtered"):
        assert totals[key] == getattr(conv, key) + getattr(point, key)
    saved = totals["kept_bytes_vanilla"] - totals["kept_bytes_filtered"]
    # the whole graph keeps less, but not by all of it: the ReLU before "6" keeps that map anyway
    assert totals["graph_kept_bytes_filtered"] < totals["graph_kept_bytes_vanilla"]
    assert totals["graph_kept_bytes_vanilla"] - totals["graph_kept_bytes_filtered"] < saved
    # model untouched
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    assert not any(is_swapped(m) for m in net.modules()) and all(p.requires_grad for p in net.parameters())
    text = report.table()
    assert text.splitlines()[2].startswith("3 ") and "total" in text and "whole autograd graph" in text


def test_module_entry_json_on_timm_resnet18():
    timm = pytest.importorskip("timm")
    cmd = [
        sys.executable, "-m", "lightning_gf.app.report", "--model", "timm:resnet18", "--input-size", "3,64,64",
        "--r", "2", "--depth", "2", "--model-kwargs", '{"zero_init_last": false}', "--json",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    rows = data["layers"]
    assert [row["name"] for row in rows] == ["layer4.1.conv1", "layer4.1.conv2"]
    c, hw, p = 512, 2 * 2, 1  # layer4 maps are 2x2 at 64 px: one 2x2 patch
    macs = c * c * 9 * hw
    for row, grads in zip(rows, (1, 2)):  # conv1 needs g_w only, conv2 also g_x
        assert row["out_size"] == [2, 2] and row["kernel"] == [3, 3] and row["r"] == 2
        assert row["kept_bytes_vanilla"] == c * hw * F32
        assert row["kept_bytes_filtered"] == c * p * F32
        assert row["backward_macs_vanilla"] == grads * macs
        assert row["backward_macs_filtered"] == grads * c * c * p
    assert data["totals"]["backward_macs_vanilla"] == 3 * macs
    assert data["config"]["depth"] == 2 and data["config"]["stride_correction"] is True
    # same weights (seed 0), same input (seed 0), same loss: same cosine
    torch.manual_seed(0)
    model = timm.create_model("resnet18", zero_init_last=False)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = gradient_fidelity(model, x, probe_loss, r=2, depth=2).as_dict()
    for row in rows:
        assert row["gw_cos"] == pytest.approx(expected[row["name"]]["gw_cos"], abs=1e-5)
        assert 0.5 < row["gw_cos"] < 1.0


def test_main_prints_a_table_and_names_bad_arguments(capsys):
    assert main(["--model", "tests.helpers.models:TinyCNN", "--input-size", "3,16,16", "--depth", "2", "--no-fidelity"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["layer", "kernel"]
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["block.0", "last.0"]
    with pytest.raises(SystemExit):
        main(["--model", "tests.helpers.models:TinyCNN", "--input-size", "16,16"])
    assert "C,H,W" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "resnet18"])
    assert "timm:NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "tests.helpers.models:TinyCNN", "--input-size", "3,16,16", "--depth", "9"])
    assert "lower depth" in capsys.readouterr().err
