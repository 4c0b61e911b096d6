"""The accuracy benchmark (benchmarks/accuracy*.py) at tiny settings: the cached front
computes what the whole model computes, fine-tuning trains the same convs and gets the
same gradients as on the whole model, finished runs are cached, and the report is right."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.accuracy import (
    END,
    PLAIN,
    START,
    BenchConfig,
    Cell,
    _model_ints,
    expected_outcome,
    main,
    methods,
    run_key,
    summarise,
)
from benchmarks.accuracy_data import DataSource
from benchmarks.accuracy_train import build_model, split_at
from lightning_gf import apply_gradient_filter


@pytest.mark.parametrize(
    "name, depth, trained, strided",
    [
        ("resnet18", 4, ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"], True),
        ("resnet18", 2, ["layer4.1.conv1", "layer4.1.conv2"], False),
        ("mobilenetv2_100", 2, ["blocks.6.0.conv_pwl", "conv_head"], False),
    ],
)
def test_split_trains_the_same_convs_with_the_same_gradients(name: str, depth: int, trained: list[str],
                                                           strided: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, 8).eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 5])
    split = split_at(model, depth, x)  # raises if tail(front(x)) != model(x)
    assert split.trained == trained and split.strided == strided
    assert torch.allclose(split.tail(split.front(x)), model(x), atol=1e-4)

    # the tail, fed the cached front output, picks the very convs the whole model would
    tail = split.tail
    features = split.front(x).detach()
    handle = apply_gradient_filter(tail, r=2, depth=depth, example_input=features)
    convs = dict(model.named_modules())
    assert [layer.module for layer in handle.layers] == [convs[n] for n in trained]
    F.cross_entropy(tail(features), y).backward()
    tail_grads = {id(p): p.grad.clone() for p in tail.parameters() if p.grad is not None}
    handle.remove()
    model.zero_grad()

    # ... and its filtered gradients equal those of the whole filtered model
    whole = copy.deepcopy(model)
    handle = apply_gradient_filter(whole, r=2, depth=depth, example_input=x)
    F.cross_entropy(whole(x), y).backward()
    whole_grads = [p.grad for p in whole.parameters() if p.grad is not None]
    assert len(whole_grads) == len(tail_grads) > 0
    by_name = dict(whole.named_parameters())
    for p_name, p in model.named_parameters():
        if id(p) in tail_grads:
            assert torch.allclose(tail_grads[id(p)], by_name[p_name].grad, rtol=1e-4, atol=1e-6), p_name
    handle.remove()


def test_summary_and_expected_outcome() -> None:
    cell = Cell.of([80.0, 82.0, 84.0])
    assert (cell.mean, cell.std, cell.low, cell.high, cell.n) == (82.0, 2.0, 80.0, 84.0, 3)
    assert str(cell) == "82.0 ± 2.0"
    table = {"resnet18": {
        2: {PLAIN: Cell.of([80.0]), "corrected r=2": Cell.of([78.0])},
        4: {"paper r=2": Cell.of([70.0]), "corrected r=2": Cell.of([74.0])},
    }}
    lines = expected_outcome(table)
    assert "= +2.0 points" in lines[0] and "**no**" in lines[0]
    assert "= +4.0 points" in lines[1] and "**yes**" in lines[1]
    assert [m.label for m in methods([2, 4])] == [PLAIN, "corrected r=2", "paper r=2", "corrected r=4", "paper r=4"]


def test_bench_runs_caches_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    (docs / "accuracy.md").write_text(f"# Accuracy\n\nintro\n\n{START}\nold\n{END}\n\nafter\n")
    args = ["--out", str(out), "--docs", str(docs), "--models", "resnet18", "--depths", "2,4", "--rs", "2",
            "--seeds", "0,1", "--image-size", "64", "--pretrain-steps", "1", "--pretrain-low-res", "32",
            "--pretrain-low-res-steps", "1", "--pretrain-batch", "4",
            "--finetune-size", "8", "--val-size", "8", "--batch-size", "4", "--epochs", "1", "--jobs", "1"]
    main(args)
    first = capsys.readouterr().out
    assert "pretraining on the 'pretrain' partition" in first and "run 12/12" in first

    results = json.loads((out / "results_objects_resnet18.json").read_text())
    runs = results["runs"]
    assert len(runs) == 2 * 2 * 3
    # depth 2 of resnet18 trains no strided conv: the paper's convention is the corrected run
    for seed in (0, 1):
        paper, corrected = runs[f"depth2/paper r=2/seed{seed}"], runs[f"depth2/corrected r=2/seed{seed}"]
        assert paper["same_as"] == f"depth2/corrected r=2/seed{seed}" and paper["acc"] == corrected["acc"]
        assert "same_as" not in runs[f"depth4/paper r=2/seed{seed}"]
    assert results["trained_convs"]["4"][1] == "layer4.0.downsample.0"

    cfg = BenchConfig(models=["resnet18"], depths=[2, 4], rs=[2], seeds=[0, 1])
    table = summarise(cfg, {"resnet18": results})
    accs = [runs[run_key(4, methods([2])[0], s)]["acc"] for s in (0, 1)]
    assert table["resnet18"][4][PLAIN].mean == pytest.approx(statistics.fmean(accs))

    text = (docs / "accuracy.md").read_text()
    assert text.startswith("# Accuracy\n\nintro\n") and text.endswith("after\n") and "old" not in text
    assert f"| resnet18 | last 4 | {results['before_finetune_acc']:.1f} | {table['resnet18'][4][PLAIN]}" in text
    assert (docs / "img" / "accuracy_objects.png").read_bytes()[:4] == b"\x89PNG"

    # a second invocation reuses the checkpoint and every run
    main(args)
    second = capsys.readouterr().out
    assert "reusing the pretrained checkpoint" in second and "run 1/" not in second
    assert json.loads((out / "results_objects_resnet18.json").read_text())["runs"] == runs


def test_data_source_checks_its_name() -> None:
    with pytest.raises(ValueError, match="data source must be one of"):
        DataSource("imagenet")
    for name, classes in (("objects", 16), ("shapes", 8)):
        src = DataSource(name, image_size=32)
        assert src.num_classes == classes
        first, again = src.finetune_set("train", 4, seed=1), src.finetune_set("train", 4, seed=1)
        assert torch.equal(first.images, again.images) and first.images.dtype == torch.float32
        assert first.images.shape == (4, 3, 32, 32) and int(first.labels.max()) < classes
        assert not torch.equal(first.images, src.finetune_set("train", 4, seed=2).images)


def test_objects_pretraining_batches_are_all_distinct_and_sized_per_phase() -> None:
    src = DataSource("objects", image_size=32)
    batches = list(src.pretrain_batches(3, 4, seed=0, image_size=24))
    assert len(batches) == 3 and all(b.images.shape == (4, 3, 24, 24) for b in batches)
    flat = torch.cat([b.images for b in batches]).flatten(1)
    assert len({tuple(row[:16].tolist()) for row in flat}) == 12  # every image drawn afresh
    again = list(src.pretrain_batches(3, 4, seed=0, image_size=24))
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, again))
    held_out = src.pretrain_val(4)
    assert held_out.images.shape == (4, 3, 32, 32)


def test_pretraining_steps_per_model() -> None:
    cfg = BenchConfig(pretrain_low_res_steps=450, pretrain_low_res_steps_for=_model_ints("mobilenetv2_100=1200"))
    assert cfg.low_res_steps("resnet18") == 450 and cfg.low_res_steps("mobilenetv2_100") == 1200
    assert "64px1200_" in cfg.checkpoint("mobilenetv2_100") and "64px450_" in cfg.checkpoint("resnet18")
    assert _model_ints("") == {}
    with pytest.raises(Exception, match="expected MODEL=STEPS"):
        _model_ints("mobilenetv2_100:1200")
