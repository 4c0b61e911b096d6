"""Load weights from a local file into a network, for offline use of pretrained models."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import nn


def _state_dict_of(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return _state_dict_of(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: not a state_dict nor a checkpoint holding one under 'state_dict'")


def load_weights(net: nn.Module, path: str, prefix: str = "model.") -> list[str]:
    """Copy the matching tensors of the checkpoint ``path`` into ``net``; return the keys left out.

    Accepts a plain ``state_dict`` (timm, smp, torchvision files), or a Lightning
    checkpoint of one of this package's modules (keys starting with ``prefix`` are
    stripped). Tensors whose shape differs (a classifier head with another number of
    classes) are left at their initial values and reported.

    Example:
        >>> import tempfile, os
        >>> src, dst = nn.Linear(2, 3), nn.Linear(2, 3)
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save(src.state_dict(), path)
        >>> load_weights(dst, path), bool((dst.weight == src.weight).all())
        ([], True)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint_path {path!r} does not exist: give a local .pt/.pth/.ckpt file")
    state = _state_dict_of(torch.load(path, map_location="cpu", weights_only=True), path)
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = net.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    left_out = sorted(k for k in own if k not in kept)
    if not kept:
        raise ValueError(f"{path}: no tensor matches the network (first keys: {list(state)[:3]}, expected e.g. {list(own)[:3]})")
    net.load_state_dict(kept, strict=False)
    if left_out:
        rank_zero_info(f"lightning_gf: {path}: {len(left_out)} tensors kept their initial values: {left_out[:6]}")
    return left_out
