"""Procedurally generated images of textured shapes, with per-pixel masks.

Deterministic (a sample depends only on ``seed``, ``split`` and its index), fast
(whole batches are drawn with tensor ops), and nothing to download. Two splits
mimic the paper's on-device protocol: ``pretrain`` (smooth backgrounds, saturated
colours, balanced classes) and ``finetune`` (the same classes, shifted: textured
darker backgrounds, muted colours, smaller shapes, more noise, skewed class
frequencies).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

SHAPE_NAMES = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "star")
NUM_SHAPES = len(SHAPE_NAMES)
SPLITS = ("pretrain", "finetune")
SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class ShapeSamples:
    """``images`` uint8 ``(N, 3, H, W)``, ``masks`` uint8 ``(N, H, W)`` (0 background,
    ``k + 1`` for shape class ``k``), ``labels`` int64 ``(N,)`` (class of the largest shape)."""

    images: Tensor
    masks: Tensor
    labels: Tensor


def check_split(split: str, subset: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of ``SPLITS`` and ``subset`` one of ``SUBSETS``.

    Example:
        >>> check_split("finetune", "val")
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")


def _seed(seed: int, split: str, subset: str, start: int) -> int:
    return zlib.crc32(f"{seed}/{split}/{subset}/{start}".encode())


def _uniform(gen: torch.Generator, n: int, low: float, high: float, *rest: int) -> Tensor:
    return torch.rand(n, *rest, generator=gen) * (high - low) + low


def _shape_inside(kind: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Whether the points ``(u, v)`` (shape-centred, unit radius) fall inside each shape."""
    u, v = u.squeeze(1), v.squeeze(1)  # (N, H, W)
    rad = torch.sqrt(u**2 + v**2)
    theta = torch.atan2(v, u)
    s3 = math.sqrt(3.0)
    masks = torch.stack(
        [
            rad <= 1.0,
            torch.maximum(u.abs(), v.abs()) <= 0.8,
            (v >= -0.5) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0),
            (rad <= 1.0) & (rad >= 0.55),
            ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95)),
            u.abs() + v.abs() <= 1.0,
            u**2 + (v / 0.4) ** 2 <= 1.0,
            rad <= 0.62 + 0.33 * torch.cos(5 * theta),
        ],
        dim=1,
    )  # (N, K, H, W)
    return masks[torch.arange(len(kind)), kind]


def _texture(gen: torch.Generator, n: int, yy: Tensor, xx: Tensor, freq: tuple[float, float]) -> Tensor:
    """Stripes of random frequency and angle in [0, 1], shape ``(N, 1, H, W)``."""
    angle = _uniform(gen, n, 0, math.pi, 1, 1, 1)
    f = _uniform(gen, n, *freq, 1, 1, 1)
    phase = _uniform(gen, n, 0, 2 * math.pi, 1, 1, 1)
    return 0.5 + 0.5 * torch.sin(f * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)


def generate_shapes(
    n: int, *, split: str = "finetune", subset: str = "train", image_size: int = 64, seed: int = 0,
    start: int = 0, max_shapes: int = 1,
) -> ShapeSamples:
    """Draw ``n`` images of ``1..max_shapes`` textured shapes.

    Example:
        >>> s = generate_shapes(4, image_size=32)
        >>> tuple(s.images.shape), s.images.dtype, int(s.masks.max()) <= NUM_SHAPES
        ((4, 3, 32, 32), torch.uint8, True)
        >>> bool((generate_shapes(4, image_size=32).images == s.images).all())  # deterministic
        True
    """
    check_split(split, subset)
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    gen = torch.Generator().manual_seed(_seed(seed, split, subset, start))
    shifted = split == "finetune"
    coords = torch.linspace(-1, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.expand(n, 1, -1, -1), xx.expand(n, 1, -1, -1)

    # background: a colour gradient (pretrain) or dark textured stripes (finetune)
    c0, c1 = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    ramp_angle = _uniform(gen, n, 0, 2 * math.pi, 1, 1, 1)
    ramp = 0.5 + 0.5 * (xx * torch.cos(ramp_angle) + yy * torch.sin(ramp_angle)) / math.sqrt(2)
    image = c0 + (c1 - c0) * ramp
    if shifted:
        image = 0.05 + 0.85 * image * (0.85 + 0.15 * _texture(gen, n, yy, xx, (6.0, 14.0)))

    masks = torch.zeros(n, image_size, image_size, dtype=torch.uint8)
    # class prior: uniform (pretrain), skewed towards the first classes (finetune)
    prior = torch.ones(NUM_SHAPES) if not shifted else torch.linspace(3.0, 0.5, NUM_SHAPES)
    counts = torch.randint(1, max_shapes + 1, (n,), generator=gen)
    first_kind = torch.multinomial(prior, n, replacement=True, generator=gen)
    for slot in range(max_shapes):
        kind = first_kind if slot == 0 else torch.multinomial(prior, n, replacement=True, generator=gen)
        radius = _uniform(gen, n, 0.45, 0.80, 1, 1, 1) if not shifted else _uniform(gen, n, 0.40, 0.75, 1, 1, 1)
        if slot > 0:
            radius = radius * 0.7
        cy, cx = _uniform(gen, n, -0.45, 0.45, 1, 1, 1), _uniform(gen, n, -0.45, 0.45, 1, 1, 1)
        rot = _uniform(gen, n, 0, 2 * math.pi, 1, 1, 1)
        dy, dx = (yy - cy) / radius, (xx - cx) / radius
        u = dx * torch.cos(rot) + dy * torch.sin(rot)
        v = -dx * torch.sin(rot) + dy * torch.cos(rot)
        inside = _shape_inside(kind, u, v).unsqueeze(1) & (counts > slot).view(n, 1, 1, 1)
        # a colour that stands out from the background's mean colour
        colour = (1.0 - image.mean((2, 3), keepdim=True) + 0.3 * torch.randn(n, 3, 1, 1, generator=gen)).clamp(0, 1)
        if shifted:
            colour = 0.1 + 0.8 * colour  # muted
        fill = colour * (0.8 + 0.2 * _texture(gen, n, yy, xx, (3.0, 10.0)))
        image = torch.where(inside, fill, image)
        masks = torch.where(inside.squeeze(1), (kind + 1).to(torch.uint8).view(n, 1, 1), masks)

    noise = 0.05 if shifted else 0.03
    image = image + noise * torch.randn(image.shape, generator=gen)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return ShapeSamples(images=images, masks=masks, labels=first_kind.long())
