"""Errors of index directories: ones that cannot be opened or written consistently, and bad granularity requests."""

from __future__ import annotations

from retrieval.errors import UserFacingError

__all__ = [
    "BackendMismatchError",
    "GranularityError",
    "IndexFormatError",
    "NotCalibratedError",
    "UnknownGranularityError",
    "UnknownLevelError",
]


class IndexFormatError(UserFacingError, ValueError):
    """An index directory that is missing files, of an unsupported version, or internally inconsistent.

    It is a ``ValueError`` so that the CLI and the server report it as a user-facing problem
    (a wrong path, an index from another version) rather than as a crash.
    """


class GranularityError(UserFacingError, ValueError):
    """A search at a granularity that this index cannot answer (see the two subclasses)."""


class NotCalibratedError(GranularityError):
    """A granularity was asked of an index without calibrated thresholds; ``retrieval index calibrate`` adds them."""


class UnknownGranularityError(GranularityError):
    """A granularity that is not one of the index's calibrated levels; the message lists them."""


class UnknownLevelError(UserFacingError, ValueError):
    """A label filter on a level the index does not have; the message lists the index's levels."""


class BackendMismatchError(UserFacingError, ValueError):
    """A backend option that contradicts the index's manifest (``--backend qdrant`` on a FAISS index, ...)."""
