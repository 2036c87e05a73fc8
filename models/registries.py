"""The model extension points: one registry each for attention and pooling modules."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from retrieval.registry import Registry

__all__ = ["ATTENTION", "POOLING"]

#: ``name -> builder(channels: int, **params) -> nn.Module`` mapping a (N, C, H, W) map to the same shape.
ATTENTION: Registry[Callable[..., nn.Module]] = Registry("attention")
#: ``name -> builder(**params) -> nn.Module`` mapping a (N, C, H, W) map to (N, C).
POOLING: Registry[Callable[..., nn.Module]] = Registry("pooling")
