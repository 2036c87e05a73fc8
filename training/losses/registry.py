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
from retrieval.registry import Registry, UnknownNameError
from training.config_keys import keyed_message

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
    "training.losses.soft",
)


def _register_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def _builder(name: str) -> LossBuilder:
    """The builder registered as ``name``; an unknown name is ``loss.name`` in a recipe, and the error says so."""
    _register_builtins()
    try:
        return LOSSES.get(name)
    except UnknownNameError as exc:
        raise UnknownNameError(f"loss.name: {exc}") from None


def available_losses() -> list[str]:
    """Names of every registered loss, the built-in ones included (sorted)."""
    _register_builtins()
    return sorted(LOSSES.names())


def needs_hierarchy(name: str) -> bool:
    """Whether the loss ``name`` needs the class tree (it declares a ``hierarchy`` parameter)."""
    return "hierarchy" in inspect.signature(_builder(name)).parameters


def is_distillation_loss(name: str) -> bool:
    """Whether the loss ``name`` distills a teacher: it must be called with ``ref_emb`` (and maybe ``indices_tuple``).

    A builder declares it with a truthy ``is_distillation`` attribute, on itself or on the class its return
    annotation names (``training.losses.distillation.DistillationLoss`` sets it), so no loss is built to ask.
    """
    builder = _builder(name)
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
        UnknownNameError: ``name`` is not registered (``loss.name: unknown loss ...``, listing the valid names).
        ConfigError: the parameters do not fit the loss; the message names the key (``loss.params.margins: ...``,
            ``loss.params.foo: not a parameter of loss 'csl' ...``).
    """
    builder = _builder(name)
    if not num_classes or any(int(c) < 1 for c in num_classes):
        raise ConfigError(f"loss {name!r}: num_classes must list a positive class count per level, got {num_classes}")
    if embedding_dim < 1:
        raise ConfigError(f"loss {name!r}: embedding_dim must be positive, got {embedding_dim}")
    args = ([int(c) for c in num_classes], int(embedding_dim))
    settable = _settable_parameters(builder)
    if settable is not None:
        unknown = sorted(set(params) - set(settable))
        if unknown:
            takes = ", ".join(settable) or "no parameters"
            raise ConfigError(f"loss.params.{unknown[0]}: not a parameter of loss {name!r} (it takes: {takes})")
    if needs_hierarchy(name):
        if hierarchy is None:
            raise ConfigError(f"loss {name!r} needs the class hierarchy (fine -> coarser labels); pass hierarchy=")
        params = {**params, "hierarchy": hierarchy}
    try:
        inspect.signature(builder).bind(*args, **params)
    except TypeError as exc:  # a missing required keyword
        raise ConfigError(f"loss.params ({name!r}): {exc}") from None
    try:
        return builder(*args, **params)
    except (ValueError, TypeError) as exc:  # the builder's own checks of the recipe's values
        raise ConfigError(keyed_message("loss.params", str(exc), settable or params, f"loss {name!r}")) from None


def _settable_parameters(builder: LossBuilder) -> list[str] | None:
    """The keyword parameters a recipe may set (``None`` when the builder takes ``**kwargs``)."""
    parameters = list(inspect.signature(builder).parameters.values())[2:]  # after num_classes, embedding_dim
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.name != "hierarchy" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
