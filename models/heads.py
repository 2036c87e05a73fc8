"""Embedding head: project pooled features to the embedding dimension and L2-normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvProjectionHead", "EmbeddingHead"]


class EmbeddingHead(nn.Module):
    """Linear projection followed by L2 normalisation.

    The output lies on the unit sphere, so inner product equals cosine similarity and a
    FAISS inner-product index ranks exactly as the losses and metrics do.
    """

    def __init__(self, in_features: int, embedding_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), p=2.0, dim=-1, eps=1e-12)


class ConvProjectionHead(nn.Module):
    """A 1x1 convolution to the embedding dimension, applied to the feature map *before* pooling.

    The AML student (Budnik & Avrithis) projects EfficientNet's feature map to the teacher's dimension with a
    1x1 convolution and then pools it with GeM, so pooling acts on the teacher-sized channels it is trained
    to match; :meth:`normalise` finishes the pooled vector.
    """

    def __init__(self, in_channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embedding_dim, kernel_size=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.proj(feature_map)

    @staticmethod
    def normalise(pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled, p=2.0, dim=-1, eps=1e-12)
