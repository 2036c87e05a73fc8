"""Admission control: a bounded number of image queries in flight, a bounded queue, and 503 beyond it.

On 2 CPU cores, 32 concurrent uploads each decoding and running the encoder at once share the cores 32 ways:
every request is slow, the slowest very slow (p99 7 s in the probe of issue 12), and each holds a decoded
image in memory. A gate lets ``limit`` queries run and the next ``max_waiting`` wait in arrival order; a
query that would wait beyond that, or longer than ``wait_s``, is refused at once with 503 and
``Retry-After``, so a client (or the load balancer) retries elsewhere instead of the server running out
of memory or time. Work happens at the pace of the cores; the queue only absorbs bursts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from retrieval.errors import UserFacingError

__all__ = ["AdmissionGate", "OverloadedError"]


class OverloadedError(UserFacingError):
    """The server is at its limit of queued queries; the API answers 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdmissionGate:
    """At most ``limit`` holders at once; at most ``max_waiting`` waiting, each for at most ``wait_s``.

    Built inside the running event loop (the app's lifespan); used only from that loop.

    Args:
        limit: holders at once (>= 1).
        max_waiting: callers allowed to wait for a place (>= 0); one more is refused immediately.
        wait_s: how long a caller waits for a place before it is refused.
        what: what is being admitted, for the error message ("image queries").
    """

    def __init__(self, limit: int, max_waiting: int, wait_s: float, what: str = "queries") -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        if max_waiting < 0 or wait_s <= 0:
            raise ValueError(f"max_waiting must be >= 0 and wait_s > 0, got {max_waiting} and {wait_s}")
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.what = what
        self._semaphore = asyncio.Semaphore(limit)
        self._active = 0
        self._waiting = 0
        self.refused = 0

    @property
    def active(self) -> int:
        """Holders now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Callers waiting for a place now."""
        return self._waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one place for the ``async with`` body.

        Raises:
            OverloadedError: ``max_waiting`` callers already wait, or no place freed within ``wait_s``.
        """
        if self._semaphore.locked() and self._waiting >= self.max_waiting:
            self.refused += 1
            raise OverloadedError(
                f"the server is busy ({self._active} {self.what} running, {self._waiting} waiting); retry shortly"
            )
        self._waiting += 1
        try:
            await asyncio.wait_for(self._semaphore.acquire(), self.wait_s)
        except TimeoutError:
            self.refused += 1
            raise OverloadedError(
                f"the server is busy: no place for the query within {self.wait_s:g} s; retry shortly"
            ) from None
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._semaphore.release()
