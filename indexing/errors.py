"""The one error type for index directories that cannot be opened or written consistently."""

from __future__ import annotations

from retrieval.errors import UserFacingError

__all__ = ["IndexFormatError"]


class IndexFormatError(UserFacingError, ValueError):
    """An index directory that is missing files, of an unsupported version, or internally inconsistent.

    It is a ``ValueError`` so that the CLI and the server report it as a user-facing problem
    (a wrong path, an index from another version) rather than as a crash.
    """
