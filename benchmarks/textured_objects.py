"""Procedurally generated photos of textured objects in clutter, for the accuracy benchmark.

An image shows one object whose *surface pattern* is its class (16 classes: stripes,
wavy stripes, checks and dots, each in four orientations or scales), with a random
silhouette, position, size and colours, in front of a cluttered background with natural
image statistics: coloured noise with a ``1/f^alpha`` amplitude spectrum and distractor
objects covered in the same kind of noise. Lighting varies (an illumination gradient,
colour cast, contrast, gamma) and sensor noise is added. The class lies in fine detail
(pattern periods of 5 to 10 px, at any image size), which is what gradient filtering approximates
least well; the shapes of ``lightning_gf.app.data.shapes`` are flat colour fields.

Two splits, as in the paper's protocol: ``pretrain`` (daylight, smooth backgrounds,
large objects, balanced classes) and ``finetune`` (the same classes, shifted: dim,
colour-cast light, busier backgrounds with more clutter, smaller objects, blur and more
noise, skewed class frequencies). Deterministic (a sample depends only on ``seed``,
``split``, ``subset`` and ``start``) and drawn a whole batch at a time with tensor ops.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gf.app.data.shapes import check_split

PATTERNS = ("stripes", "waves", "checks", "dots")
NUM_CLASSES = 4 * len(PATTERNS)
CLASS_NAMES = tuple(
    [f"stripes {a}deg" for a in (0, 45, 90, 135)]
    + [f"waves {a}deg" for a in (0, 45, 90, 135)]
    + [f"checks {a}deg {s}" for s in ("fine", "coarse") for a in (0, 45)]
    + [f"dots {a}deg {s}" for s in ("fine", "coarse") for a in (0, 45)]
)
_FINE, _MID, _COARSE = 5.0, 7.0, 10.0  # pattern periods in pixels, whatever the image size


@dataclass(frozen=True)
class TexturedObjects:
    """``images`` uint8 ``(N, 3, H, W)`` and ``labels`` int64 ``(N,)`` (the object's pattern class)."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class _Look:
    """How a split looks: the ranges its nuisances are drawn from."""

    alpha: tuple[float, float]  # background spectrum: amplitude ~ 1/f^alpha
    clutter: int  # at most this many distractor objects
    radius: tuple[float, float]  # object radius, in half image widths
    light: tuple[float, float]  # overall brightness
    cast: float  # colour cast: per-channel gain in 1 +- cast
    contrast: tuple[float, float]  # pattern contrast on the object
    blur: float  # Gaussian blur sigma, in pixels
    noise: float  # sensor noise std
    prior: tuple[float, float]  # class weights go linearly from the first to the last


_LOOKS = {
    "pretrain": _Look(alpha=(1.4, 2.0), clutter=2, radius=(0.45, 0.75), light=(0.8, 1.1), cast=0.1,
                      contrast=(0.6, 1.0), blur=0.0, noise=0.02, prior=(1.0, 1.0)),
    "finetune": _Look(alpha=(0.9, 1.4), clutter=4, radius=(0.35, 0.6), light=(0.45, 0.8), cast=0.3,
                      contrast=(0.35, 0.8), blur=0.6, noise=0.05, prior=(2.0, 0.5)),
}


def _seed(seed: int, split: str, subset: str, start: int) -> int:
    return zlib.crc32(f"textured/{seed}/{split}/{subset}/{start}".encode())


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """``n`` uniform draws in ``[low, high)``, shaped ``(n, 1, 1, 1)`` to broadcast over images."""
    return (torch.rand(n, generator=gen) * (high - low) + low).view(n, 1, 1, 1)


def _noise_1_over_f(gen: torch.Generator, n: int, channels: int, size: int, alpha: Tensor) -> Tensor:
    """Gaussian noise with amplitude spectrum ``1/f^alpha`` (per image), zero mean, unit std per channel."""
    white = torch.randn(n, channels, size, size, generator=gen)
    fy = torch.fft.fftfreq(size).view(-1, 1)
    fx = torch.fft.rfftfreq(size).view(1, -1)
    freq = torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / size)
    spectrum = torch.fft.rfft2(white) / freq ** alpha.view(n, 1, 1, 1)
    noise = torch.fft.irfft2(spectrum, s=(size, size))
    noise = noise - noise.mean((2, 3), keepdim=True)
    return noise / noise.std((2, 3), keepdim=True).clamp_min(1e-6)


def _silhouette(gen: torch.Generator, n: int, yy: Tensor, xx: Tensor, radius: Tensor, size: int) -> Tensor:
    """Soft (anti-aliased) masks in ``[0, 1]`` of random shapes: disk, square, diamond, triangle, hexagon, ellipse."""
    cy, cx = _uniform(gen, n, -0.5, 0.5), _uniform(gen, n, -0.5, 0.5)
    rot = _uniform(gen, n, 0, 2 * math.pi)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    u = dx * torch.cos(rot) + dy * torch.sin(rot)
    v = -dx * torch.sin(rot) + dy * torch.cos(rot)
    s3 = math.sqrt(3.0) / 2
    gauges = torch.stack([
        torch.sqrt(u**2 + v**2),
        torch.maximum(u.abs(), v.abs()) * 1.2,
        (u.abs() + v.abs()) * 0.85,
        torch.maximum(torch.maximum(-v, s3 * u + 0.5 * v), -s3 * u + 0.5 * v) * 2.0,
        torch.maximum(torch.maximum(u.abs(), (0.5 * u + s3 * v).abs()), (0.5 * u - s3 * v).abs()) * 1.1,
        torch.sqrt(u**2 + (v / 0.6) ** 2),
    ])  # (6, n, 1, H, W); inside where < 1
    kind = torch.randint(0, len(gauges), (n,), generator=gen)
    gauge = gauges[kind, torch.arange(n)]
    pixels = radius * size / 2  # the gauge's unit, in pixels
    return torch.sigmoid((1.0 - gauge) * pixels * 1.5)


def _pattern(gen: torch.Generator, labels: Tensor, yy: Tensor, xx: Tensor, size: int) -> Tensor:
    """The class patterns in ``[0, 1]`` (soft-edged), shape ``(N, 1, H, W)``; periods in pixels, as a
    camera of higher resolution would see a wider view of the same material."""
    n = len(labels)
    family, variant = labels // 4, labels % 4
    oriented = family < 2  # stripes and waves: variant = orientation 0/45/90/135
    angle = torch.where(oriented, variant * (math.pi / 4), (variant % 2) * (math.pi / 4)).view(n, 1, 1, 1)
    angle = angle + _uniform(gen, n, -0.15, 0.15)  # +-9 degrees
    period = torch.where(oriented, torch.full((n,), _MID), torch.where(variant < 2, _FINE, _COARSE)).view(n, 1, 1, 1)
    freq = (size - 1) * math.pi / period * _uniform(gen, n, 0.88, 1.12)  # radians per unit (the image spans 2)
    u = xx * torch.cos(angle) + yy * torch.sin(angle)
    v = -xx * torch.sin(angle) + yy * torch.cos(angle)
    pu, pv = freq * u + _uniform(gen, n, 0, 2 * math.pi), freq * v + _uniform(gen, n, 0, 2 * math.pi)
    stripes = torch.sin(pu)
    waves = torch.sin(pu + 1.6 * torch.sin(pv / 2.5))
    checks = torch.sin(pu) * torch.sin(pv) * 2.0
    dots = torch.cos(pu) + torch.cos(pv) - 1.0
    wave = torch.stack([stripes, waves, checks, dots])[family, torch.arange(n)]
    return torch.sigmoid(4.0 * wave)


def _blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur, ``sigma`` in pixels (no-op below 0.3 px)."""
    if sigma < 0.3:
        return image
    half = int(math.ceil(2.5 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=image.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    c = image.shape[1]
    image = F.conv2d(F.pad(image, (half, half, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                     groups=c)
    return F.conv2d(F.pad(image, (0, 0, half, half), mode="reflect"), taps.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def generate_textured_objects(
    n: int, *, split: str = "pretrain", subset: str = "train", image_size: int = 64, seed: int = 0, start: int = 0,
) -> TexturedObjects:
    """Draw ``n`` images of textured objects in clutter (see the module docstring).

    Example:
        >>> s = generate_textured_objects(4, image_size=32)
        >>> tuple(s.images.shape), s.images.dtype, s.labels.dtype
        ((4, 3, 32, 32), torch.uint8, torch.int64)
        >>> bool((generate_textured_objects(4, image_size=32).images == s.images).all())  # deterministic
        True
    """
    check_split(split, subset)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels (the patterns need them), got {image_size}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    look = _LOOKS[split]
    gen = torch.Generator().manual_seed(_seed(seed, split, subset, start))
    coords = torch.linspace(-1, 1, image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    yy, xx = yy.expand(n, 1, -1, -1), xx.expand(n, 1, -1, -1)

    # background: a mean colour plus coloured 1/f noise (luminance and weaker chroma)
    alpha = _uniform(gen, n, *look.alpha).view(n)
    lum = _noise_1_over_f(gen, n, 1, image_size, alpha)
    chroma = _noise_1_over_f(gen, n, 3, image_size, alpha)
    tint = 1.0 + 0.3 * torch.randn(n, 3, 1, 1, generator=gen)
    image = torch.rand(n, 3, 1, 1, generator=gen) * 0.6 + 0.2 + 0.16 * lum * tint + 0.05 * chroma

    # clutter: distractor objects covered in 1/f noise of their own colour
    stuff = _noise_1_over_f(gen, n, 1, image_size, alpha)
    counts = torch.randint(0, look.clutter + 1, (n,), generator=gen)
    for slot in range(look.clutter):
        radius = _uniform(gen, n, 0.2, 0.55)
        mask = _silhouette(gen, n, yy, xx, radius, image_size) * (counts > slot).view(n, 1, 1, 1)
        fill = torch.rand(n, 3, 1, 1, generator=gen) * 0.8 + 0.1 + 0.15 * torch.roll(stuff, 7 * slot + 5, dims=-1)
        image = image + mask * (fill - image)

    # the object: its class pattern mixes two random colours
    prior = torch.linspace(look.prior[0], look.prior[1], NUM_CLASSES)
    labels = torch.multinomial(prior, n, replacement=True, generator=gen)
    pattern = _pattern(gen, labels, yy, xx, image_size)
    c0 = torch.rand(n, 3, 1, 1, generator=gen)
    c1 = (c0 + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5)).clamp(0, 1)
    c1 = torch.where((c1 - c0).abs().sum(1, keepdim=True) < 0.5, 1.0 - c0, c1)  # keep the pattern visible
    contrast = _uniform(gen, n, *look.contrast)
    mid = (c0 + c1) / 2
    fill = mid + contrast * (c0 - mid + (c1 - c0) * pattern)
    mask = _silhouette(gen, n, yy, xx, _uniform(gen, n, *look.radius), image_size)
    image = image + mask * (fill - image)

    # lighting: brightness, an illumination gradient, colour cast, gamma; then optics and sensor
    angle = _uniform(gen, n, 0, 2 * math.pi)
    gradient = 1.0 + _uniform(gen, n, 0.0, 0.35) * (xx * torch.cos(angle) + yy * torch.sin(angle))
    cast = 1.0 + (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1) * look.cast
    image = image.clamp(0, 1) ** _uniform(gen, n, 0.8, 1.25) * _uniform(gen, n, *look.light) * gradient * cast
    image = _blur(image, look.blur)
    image = image + look.noise * torch.randn(image.shape, generator=gen)
    images = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return TexturedObjects(images=images, labels=labels)
