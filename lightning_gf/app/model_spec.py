"""Build a model from a short text spec: ``timm:NAME``, ``torchvision:NAME`` or ``module:callable``."""

from __future__ import annotations

import importlib
from typing import Any, Optional

from torch import nn


def build_model(spec: str, *, pretrained: bool = False, num_classes: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec``.

    - ``timm:resnet18``: ``timm.create_model("resnet18", pretrained=pretrained)``;
    - ``torchvision:resnet18``: ``torchvision.models.get_model`` (default weights if pretrained);
    - ``package.module:name``: calls ``name()`` from that module (e.g. a class).

    ``num_classes`` (when given) and ``kwargs`` are passed to the model's constructor. Pretrained weights are downloaded by
    timm/torchvision on first use (or read from their cache).

    Example:
        >>> build_model("torch.nn:Identity")
        Identity()
    """
    source, sep, name = spec.partition(":")
    if not sep or not source or not name:
        raise ValueError(
            f"model spec {spec!r} is not 'timm:NAME', 'torchvision:NAME' or 'package.module:callable'"
        )
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "timm":
        import timm

        if name not in timm.list_models(name):
            raise ValueError(f"timm has no model {name!r}; see timm.list_models('*{name[:4]}*')")
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    if source == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    try:
        module = importlib.import_module(source)
    except ImportError as err:
        raise ValueError(f"cannot import {source!r} for model spec {spec!r}: {err}") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{source!r} has no callable {name!r} (model spec {spec!r})")
    if pretrained:
        raise ValueError(f"--pretrained applies to timm: and torchvision: specs only, not {spec!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
    return model
