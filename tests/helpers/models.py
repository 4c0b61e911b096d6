"""Small hand-made models for the tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """stem -> block -> SE-style 1x1-map conv -> last conv -> head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.se = nn.Conv2d(8, 8, 1)
        self.last = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        x = self.last(x)
        return self.head(x.mean((2, 3)))


class Branchy(nn.Module):
    """Registration order differs from execution order; two parallel branches read one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(8, 4, 1)  # runs last
        self.branch_b = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.branch_a = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # runs first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        return self.fuse(torch.cat([self.branch_a(x), self.branch_b(x)], 1))


class KwargsDictModel(nn.Module):
    """Takes a keyword argument and returns a dict (like models with aux heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.aux = nn.Conv2d(4, 2, 1)

    def forward(self, image: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        x = self.b(torch.relu(self.a(image))) * scale
        return {"out": x, "aux": self.aux(x)}


class TwoStages(nn.Module):
    """conv a -> BN -> ReLU -> conv b -> BN -> ReLU -> conv c: three filtered convs, per-layer r."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(self.stem(x))))
        return self.c(torch.relu(self.bn_b(self.b(x))))
