"""Turn a builder's error into one line that names the config key to change.

Builders (losses, samplers) check their arguments with messages that start with the argument's name
(``margins needs one value per label level (2), ...``, ``gamma must be positive``). A recipe user does not
call the builder: they wrote ``loss.params.margins``. :func:`keyed_message` rewrites the message around
that key, so the CLI prints ``error: loss.params.margins: needs one value per label level (2), ...``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["keyed_message"]

_LEADING_NAME = re.compile(r"[A-Za-z_]\w*")


def keyed_message(section: str, message: str, names: Iterable[str], owner: str | None = None) -> str:
    """``section.<name>: rest`` when ``message`` starts with one of ``names``, else ``section (owner): message``.

    Args:
        section: the config path of the builder's arguments (``"loss.params"``).
        message: the builder's error message.
        names: the arguments a user may set there.
        owner: what was being built (``"loss 'csl'"``), shown when no argument can be named.
    """
    match = _LEADING_NAME.match(message)
    if match and match.group(0) in set(names):
        name = match.group(0)
        rest = message[match.end() :]
        # "margins needs one value" -> "needs one value"; "classes_per_batch=20 exceeds" stays whole
        shown = rest.lstrip(" :") if rest[:1] in (" ", ":") and rest.strip(" :") else message
        return f"{section}.{name}: {shown}"
    return f"{section} ({owner}): {message}" if owner else f"{section}: {message}"
