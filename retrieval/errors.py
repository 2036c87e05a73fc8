"""The base class of every error whose message is written for the person at the keyboard.

The CLI prints such errors as one ``error: ...`` line and exits with status 2, and the
HTTP API turns them into 4xx responses; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserFacingError"]


class UserFacingError(Exception):
    """Mixin base: bad input, missing files or mismatched artifacts, explained in the message."""
