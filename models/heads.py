"""Embedding head: project pooled features to the embedding dimension and L2-normalise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingHead"]


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
