"""The textured-objects generator of the accuracy benchmark (benchmarks/textured_objects.py)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.textured_objects import (
    CLASS_NAMES,
    NUM_CLASSES,
    _noise_1_over_f,
    generate_textured_objects,
)


def test_deterministic_and_every_draw_differs() -> None:
    a = generate_textured_objects(6, image_size=32, seed=3)
    b = generate_textured_objects(6, image_size=32, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    for other in (dict(seed=4), dict(seed=3, subset="val"), dict(seed=3, start=6), dict(seed=3, split="finetune")):
        assert not torch.equal(a.images, generate_textured_objects(6, image_size=32, **other).images), other


def test_shapes_dtypes_and_range() -> None:
    s = generate_textured_objects(16, split="finetune", image_size=40)
    assert s.images.shape == (16, 3, 40, 40) and s.images.dtype == torch.uint8
    assert s.labels.shape == (16,) and s.labels.dtype == torch.int64
    assert 0 <= int(s.labels.min()) and int(s.labels.max()) < NUM_CLASSES == len(CLASS_NAMES) == 16
    # not flat: every image uses a wide range of values
    spread = s.images.flatten(1).float().quantile(0.95, dim=1) - s.images.flatten(1).float().quantile(0.05, dim=1)
    assert bool((spread > 40).all())


def test_class_frequencies_balanced_for_pretraining_and_skewed_after_the_shift() -> None:
    pre = generate_textured_objects(1600, image_size=16).labels.bincount(minlength=NUM_CLASSES)
    assert int(pre.min()) > 60 and int(pre.max()) < 140  # 100 expected per class
    post = generate_textured_objects(1600, split="finetune", image_size=16).labels.bincount(minlength=NUM_CLASSES)
    assert post[:4].sum() > 2.5 * post[-4:].sum()  # class weights fall from 2 to 0.5


def test_the_shifted_split_is_darker_and_noisier() -> None:
    pre = generate_textured_objects(64, image_size=32).images.float()
    post = generate_textured_objects(64, split="finetune", image_size=32).images.float()
    assert post.mean() < 0.8 * pre.mean()
    fine = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()  # noqa: E731
    assert fine(post) / post.mean() > fine(pre) / pre.mean()


def test_the_class_is_in_the_pattern_orientation() -> None:
    """Stripes at 0 degrees vary along x (vertical stripes), at 90 degrees along y."""
    s = generate_textured_objects(800, image_size=48, seed=1)
    gray = s.images.float().mean(1)
    gx = (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))
    gy = (gray[:, 1:, :] - gray[:, :-1, :]).abs().mean((1, 2))
    ratio = gx / gy
    assert CLASS_NAMES[0] == "stripes 0deg" and CLASS_NAMES[2] == "stripes 90deg"
    assert ratio[s.labels == 0].mean() > 1.15 and ratio[s.labels == 2].mean() < 1 / 1.15


def test_background_noise_has_the_asked_spectrum() -> None:
    alpha = torch.tensor([1.0, 2.0])
    noise = _noise_1_over_f(torch.Generator().manual_seed(0), 2, 8, 64, alpha)
    assert noise.shape == (2, 8, 64, 64)
    assert torch.allclose(noise.std((2, 3)), torch.ones(2, 8), atol=1e-4)
    power = torch.fft.rfft2(noise).abs().pow(2).mean(1)  # (2, 64, 33)
    freq = torch.sqrt(torch.fft.fftfreq(64).view(-1, 1) ** 2 + torch.fft.rfftfreq(64).view(1, -1) ** 2)
    low, high = (freq > 0.04) & (freq < 0.06), (freq > 0.16) & (freq < 0.24)
    for i, a in enumerate(alpha.tolist()):
        slope = math.log(power[i][high].mean() / power[i][low].mean()) / math.log(0.2 / 0.05)
        assert slope == pytest.approx(-2 * a, abs=0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(split="test"), "split must be one of"), (dict(subset="holdout"), "subset must be one of"),
     (dict(image_size=8), "at least 16 pixels"), (dict(n=0), "n must be at least 1")],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    args = dict(n=2, image_size=32) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_textured_objects(args.pop("n"), **args)
