"""The loss registry and its factory.

Every loss is built the same way, ``builder(num_classes, embedding_dim, **params)``, where
``num_classes`` lists the number of classes per label level (finest first). A loss that needs
only one level or none (pair-based losses) simply ignores what it does not use; this uniform
signature is what lets a YAML recipe name any loss without the trainer knowing its type.

A loss that needs the class tree (which middle and coarse class each fine class belongs to, as Cross-
Scale Learning does for its shared proxies) declares a ``hierarchy`` keyword; ``create_loss`` passes
the ``(C_fine, L)`` table of :func:`retrieval.data.labels.class_parents` to it and to no other loss.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from retrieval.config import ConfigError
from retrieval.registry import Registry

__all__ = ["LOSSES", "LossBuilder", "available_losses", "create_loss", "is_distillation_loss", "needs_hierarchy"]

LossBuilder = Callable[..., nn.Module]

#: ``name -> builder(num_classes: list[int], embedding_dim: int, **params) -> nn.Module``.
LOSSES: Registry[LossBuilder] = Registry("loss")

# Modules whose import registers the built-in losses; a new loss family adds its module here.
_BUILTIN_MODULES: tuple[str, ...] = (
    "training.losses.classification",
    "training.losses.pair",
    "training.losses.csl",
    "training.losses.distillation",
)


def _register_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_losses() -> list[str]:
    """Names of every registered loss, the built-in ones included (sorted)."""
    _register_builtins()
    return sorted(LOSSES.names())


def needs_hierarchy(name: str) -> bool:
    """Whether the loss ``name`` needs the class tree (it declares a ``hierarchy`` parameter)."""
    _register_builtins()
    return "hierarchy" in inspect.signature(LOSSES.get(name)).parameters


def is_distillation_loss(name: str) -> bool:
    """Whether the loss ``name`` distills a teacher: it must be called with ``ref_emb`` (and maybe ``indices_tuple``).

    A builder declares it with a truthy ``is_distillation`` attribute, on itself or on the class its return
    annotation names (``training.losses.distillation.DistillationLoss`` sets it), so no loss is built to ask.
    """
    _register_builtins()
    builder = LOSSES.get(name)
    if getattr(builder, "is_distillation", False):
        return True
    try:
        built = typing.get_type_hints(builder).get("return")
    except (NameError, TypeError):  # an annotation that does not resolve at run time: not declared
        return False
    return bool(getattr(built, "is_distillation", False))


def create_loss(
    name: str,
    num_classes: Sequence[int],
    embedding_dim: int,
    *,
    hierarchy: np.ndarray | None = None,
    **params: Any,
) -> nn.Module:
    """Build the loss registered as ``name``.

    Args:
        name: registered loss name (see ``LOSSES.names()``), e.g. ``"multiscale_cosface"``.
        num_classes: number of classes at each label level, finest first (one entry per label column).
        embedding_dim: dimension of the embeddings the loss receives.
        hierarchy: ``(C_fine, L)`` parent ids of every fine class (``class_parents``); required by the
            losses that declare a ``hierarchy`` parameter, ignored by the others.
        **params: loss-specific hyper-parameters from the recipe's ``loss.params``.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
        ConfigError: the parameters do not fit the loss (the message names the loss).
    """
    _register_builtins()
    builder = LOSSES.get(name)
    if not num_classes or any(int(c) < 1 for c in num_classes):
        raise ConfigError(f"loss {name!r}: num_classes must list a positive class count per level, got {num_classes}")
    if embedding_dim < 1:
        raise ConfigError(f"loss {name!r}: embedding_dim must be positive, got {embedding_dim}")
    args = ([int(c) for c in num_classes], int(embedding_dim))
    if needs_hierarchy(name):
        if hierarchy is None:
            raise ConfigError(f"loss {name!r} needs the class hierarchy (fine -> coarser labels); pass hierarchy=")
        params = {**params, "hierarchy": hierarchy}
    try:
        inspect.signature(builder).bind(*args, **params)
    except TypeError as exc:  # an unknown or missing keyword in a recipe
        raise ConfigError(f"loss {name!r}: invalid parameters {sorted(params)}: {exc}") from None
    return builder(*args, **params)
