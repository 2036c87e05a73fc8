"""Backbone factory over timm: any timm model name that produces a (N, C, H, W) feature map.

Pretrained weights come either through timm (``pretrained=True``, which downloads from
the hub and so needs network access) or from a local file (``weights=PATH``), which is
the route on offline machines. Local files are read without unpickling code:
safetensors directly, ``.pth``/``.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from retrieval.errors import UserFacingError

__all__ = ["BackboneError", "create_backbone", "load_backbone_weights"]

logger = logging.getLogger(__name__)


class BackboneError(UserFacingError, RuntimeError):
    """A backbone that cannot be built or whose weights cannot be loaded."""


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> nn.Module:
    """Build a timm model without classifier or global pooling, exposing ``forward_features``.

    Args:
        name: any timm model name (``timm.list_models()``), e.g. ``resnet101``, ``efficientnet_b3``.
        pretrained: load timm's pretrained weights (network access to the hub is needed).
        weights: a local weights file to load instead (safetensors, or a ``.pth``/``.bin`` state dict).

    Raises:
        BackboneError: unknown name, or pretrained weights that cannot be fetched or loaded.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BackboneError(f"unknown timm backbone {name!r}.{hint}")
    use_hub = pretrained and weights is None
    try:
        model = timm.create_model(name, pretrained=use_hub, num_classes=0, global_pool="")
    except Exception as exc:  # timm/hf-hub raise many network error types
        if not use_hub:
            raise
        raise BackboneError(
            f"could not fetch pretrained weights for {name!r} through timm ({type(exc).__name__}: {exc}). "
            "On a machine without network access, download the weights elsewhere and pass them with "
            "--weights PATH (a safetensors or .pth state dict), or train from scratch with pretrained=false."
        ) from exc
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``, ignoring classifier weights the backbone no longer has.

    Raises:
        BackboneError: missing file, unreadable file, or backbone parameters absent from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):  # common wrappers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise BackboneError(
            f"{path} does not match this backbone: {len(result.missing_keys)} parameters missing (e.g. {shown})"
        )
    if result.unexpected_keys:
        logger.info("ignored %d unexpected keys from %s (classifier head)", len(result.unexpected_keys), path)
