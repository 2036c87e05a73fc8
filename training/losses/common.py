"""Helpers every loss shares: label-matrix checks, level selection and full-precision similarities."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["as_label_matrix", "check_label_range", "check_levels", "full_precision", "labels_for_levels"]


def as_label_matrix(labels: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Return labels as an int64 ``(N, L)`` tensor; a ``(N,)`` vector becomes one (finest) level.

    Raises:
        ValueError: wrong rank, wrong number of rows, or a non-integer dtype.
    """
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (N,) or (N, L), got {tuple(labels.shape)}")
    if labels.shape[0] != num_embeddings:
        raise ValueError(f"labels have {labels.shape[0]} rows but there are {num_embeddings} embeddings")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    return labels.long()


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    # Half-precision logits times s = 30 lose the margin's effect; compute in float32 (float64 stays float64).
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def check_levels(levels: Sequence[int] | None, num_levels: int) -> list[int]:
    if levels is None:
        return list(range(num_levels))
    chosen = list(levels)
    if not chosen:
        raise ValueError("levels is empty; select at least one label level (or leave it unset for all)")
    if any(isinstance(k, bool) or not isinstance(k, int) for k in chosen):
        raise ValueError(f"levels must be label column indices (0 = finest), got {chosen}")
    if len(set(chosen)) != len(chosen) or any(not 0 <= k < num_levels for k in chosen):
        raise ValueError(f"levels must be distinct indices in [0, {num_levels}), got {chosen}")
    return chosen


def check_label_range(labels: torch.Tensor, level: int, num_classes: int) -> None:
    """Raise when the ids of one label column fall outside ``[0, num_classes)`` (a mismatched dataset)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels at level {level} must lie in [0, {num_classes}); got values outside")


def labels_for_levels(labels: torch.Tensor, embeddings: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """Validate ``labels`` for a loss over ``levels`` and return them as an int64 ``(N, L)`` matrix on the device."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, D), got {tuple(embeddings.shape)}")
    matrix = as_label_matrix(labels, embeddings.shape[0]).to(embeddings.device)
    if matrix.shape[1] <= max(levels):
        raise ValueError(
            f"the loss uses label level {max(levels)} but the labels have only {matrix.shape[1]} column(s)"
        )
    return matrix
