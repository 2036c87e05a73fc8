"""Attention modules applied to the backbone's feature map before pooling.

The encoder keeps a slot for a feature-map attention module so that GLAM (a later
addition) plugs in without changing the encoder; ``identity`` fills the slot until then.
"""

from __future__ import annotations

import torch
from torch import nn

from models.registries import ATTENTION

__all__ = ["IdentityAttention"]


@ATTENTION.register("identity")
class IdentityAttention(nn.Module):
    """No attention: the feature map passes through unchanged."""

    def __init__(self, channels: int = 0) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
