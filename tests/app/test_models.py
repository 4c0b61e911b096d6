"""The LightningModules of the recipes: timm classifier, smp segmenter, optimiser, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from lightning_gf.app.models import ImageClassifier, SemanticSegmenter
from lightning_gf.app.models.checkpoint import load_weights
from lightning_gf.app.models.optim import build_optimizer, warmup_cosine
from lightning_gf.app.models.segmenter import ARCHITECTURES


def test_classifier_starts_from_a_local_checkpoint_with_another_head(tmp_path: Path) -> None:
    source = timm.create_model("resnet18", num_classes=5)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    m = ImageClassifier("resnet18", num_classes=3, checkpoint_path=str(path))
    assert torch.equal(m.model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert m.model.fc.weight.shape == (3, 512)  # the head of another size is left re-initialised


def test_checkpoint_of_this_module_loads_without_its_prefix(tmp_path: Path) -> None:
    a = ImageClassifier("resnet18", num_classes=3)
    path = tmp_path / "a.ckpt"
    torch.save({"state_dict": a.state_dict(), "epoch": 1}, path)
    b = ImageClassifier("resnet18", num_classes=3)
    assert load_weights(b.model, str(path)) == []
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        ImageClassifier("resnet18", num_classes=3, checkpoint_path=str(tmp_path / "none.pt"))
    path = tmp_path / "other.pt"
    torch.save({"x.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no tensor matches"):
        load_weights(torch.nn.Linear(2, 2), str(path))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"model_name": "resnet_nope"}, "timm"), ({"optimizer": "lbfgs"}, "optimizer"), ({"lr": 0}, "lr"),
     ({"warmup_ratio": 1.0}, "warmup_ratio"), ({"num_classes": 1}, "num_classes")],
)
def test_classifier_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**{"num_classes": 3, **kwargs})


def test_optimizer_only_gets_trainable_parameters_and_warms_up() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    conf = build_optimizer(net.parameters(), optimizer="adamw", lr=0.1, weight_decay=0.0, momentum=0.0,
                           warmup_ratio=0.2, total_steps=10)
    params = conf["optimizer"].param_groups[0]["params"]
    assert len(params) == 2 and all(p.requires_grad for p in params)
    lrs = []
    for _ in range(10):
        lrs.append(conf["optimizer"].param_groups[0]["lr"])
        conf["optimizer"].step()
        conf["lr_scheduler"]["scheduler"].step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(0.1)  # two warm-up steps, then the peak
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.01  # cosine down to ~0
    assert warmup_cosine(10, 10, 2) == 0.0
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(net.parameters(), optimizer="sgd", lr=0.1, weight_decay=0, momentum=0, warmup_ratio=0,
                        total_steps=1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_segmenter_architectures(arch: str) -> None:
    m = SemanticSegmenter(arch, "resnet18", num_classes=4).eval()  # batch of 1: BatchNorm in eval
    assert m(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_segmenter_ignores_255_and_scores_mean_iou() -> None:
    torch.manual_seed(0)
    m = SemanticSegmenter("FPN", "resnet18", num_classes=3).eval()  # no dropout: comparable outputs
    images = torch.randn(2, 3, 32, 32)
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[:, :16] = 255
    logits = m(images)
    loss = m.training_step((images, masks), 0)
    keep = masks != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], masks[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a perfect prediction scores mIoU 1 whatever the ignored pixels hold
    m.val_miou.update(torch.where(keep, masks, torch.zeros_like(masks)), masks)
    assert m.val_miou.compute().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="arch"):
        SemanticSegmenter("SegFormer9000", "resnet18", num_classes=3)
