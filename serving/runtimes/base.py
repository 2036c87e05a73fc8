"""What every query-encoder runtime shares: the ``QueryEncoder`` interface, the registry and the runtime class contract.

A query encoder only has to turn query images into vectors in the index's space; whether it runs in
PyTorch, ONNX Runtime or a TensorRT engine is a deployment choice. Each runtime is a class registered in
``RUNTIMES`` that can say, from the path alone and without importing its heavy framework, whether it
opens that path (``reject_reason``/``accepts``), so ``open_query_encoder`` picks one by what the file is,
not by its suffix. This module imports neither torch nor ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.data.preprocess import PreprocessConfig
from retrieval.errors import UserFacingError
from retrieval.registry import Registry

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "RUNTIMES",
    "QueryEncoder",
    "QueryEncoderError",
    "QueryEncoderRuntime",
    "check_batch_size",
]

#: Images per forward pass inside ``encode``; bounds memory for long query lists.
DEFAULT_BATCH_SIZE = 32


class QueryEncoderError(UserFacingError, ValueError):
    """A query-encoder path that does not exist, that no runtime can open, or a runtime that cannot run here."""


@runtime_checkable
class QueryEncoder(Protocol):
    """What the search engine needs from a query encoder.

    Attributes:
        encoder_id: id of the weights (an index accepts its own encoder id).
        teacher_id: id of the teacher a distilled student lands on (an index built by that teacher accepts it).
        dim: embedding dimension.
        preprocess: how images are prepared before the network.
    """

    encoder_id: str
    teacher_id: str | None
    dim: int
    preprocess: PreprocessConfig

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        ...


class QueryEncoderRuntime:
    """Base of the registered runtime classes: how a runtime says which paths it opens.

    Subclasses set ``expects`` (a phrase for error messages: what a path must be) and implement
    ``reject_reason``, which must stay cheap and must not import the runtime's framework: it runs for
    every runtime in turn while ``open_query_encoder`` looks for one that accepts a path, so a probe
    that imported torch would cost an ONNX-only process the seconds this design saves.
    """

    #: What a path must be for this runtime, e.g. "an encoder checkpoint directory (config.json + ...)".
    expects: ClassVar[str] = ""

    @classmethod
    def reject_reason(cls, path: Path) -> str | None:
        """Why this runtime cannot open ``path`` (a short phrase), or ``None`` when it can."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, path: str | Path) -> bool:
        """Whether this runtime can open ``path`` (see ``reject_reason``)."""
        return cls.reject_reason(Path(path)) is None

    def __init__(self, path: str | Path, **options: Any) -> None:  # pragma: no cover - the signature subclasses keep
        raise NotImplementedError


#: ``name -> runtime class``; each class opens a path (``cls(path, **options)``) into a ``QueryEncoder``.
RUNTIMES: Registry[type[QueryEncoderRuntime]] = Registry("runtime")


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` if it is a positive integer; a ``ValueError`` naming it otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
