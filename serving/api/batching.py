"""A micro-batcher: concurrent queries embedded together in one ``encode`` call.

A network forward pass over 8 images costs much less than 8 passes over one, so under load the
server gathers the queries waiting for the encoder and runs them as one batch. The first query of a
batch waits at most ``max_wait_s`` for company, and a batch holds at most ``max_size`` queries, so
latency stays bounded. One worker runs one batch at a time in a worker thread; the queries that
arrive meanwhile form the next batch.

Whether batching pays depends on the hardware, so ``serving.settings`` turns it off by default
(``batch_max_size=1``) after measuring with ``benchmarks/bench_http.py`` on the 2-core CPU development
machine (resnet10t at 224 px, ONNX Runtime, 640x480 JPEG queries, 16 concurrent clients). When a batch
decoded its uploads one after the other in its own thread, batches of 16 gave 18.9 requests/s against 36.2
without; since each request decodes its own upload before joining a batch, the two are level (65.6 vs 67.2
requests/s in one run on a quiet machine, p99 317 vs 337 ms): on a CPU, concurrent single-image runs
already keep every core busy, so there is nothing left for batching to win. On a GPU one batched forward
pass costs little more than one image, which is where ``batch_max_size=16`` belongs. ``batch_max_wait_ms=0``
(the default) adds no latency to a lone query: batches form from the queries that queue up while the encoder
is busy. Models with a static batch of one (the mobile export)
gain nothing, since their runtime loops over the images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio.to_thread

__all__ = ["BatcherClosedError", "MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosedError(RuntimeError):
    """A query submitted to (or still waiting in) a batcher that is shutting down."""


class MicroBatcher(Generic[T, R]):
    """Collect concurrent items into batches for ``process``, run in a worker thread.

    Args:
        process: turns a batch of items into one outcome per item, in order: a result, or an
            exception to raise to that item's caller (e.g. an undecodable upload) while the others
            succeed. An exception raised by ``process`` itself fails the whole batch.
        max_size: most items per batch; 1 calls ``process`` directly for each item, without a queue.
        max_wait_s: how long the first item of a batch waits for more; 0 takes only those already queued.
        on_batch: called with the size of every batch (for the metrics).
    """

    def __init__(
        self,
        process: Callable[[list[T]], list[R | BaseException]],
        max_size: int = 16,
        max_wait_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the worker task on the running event loop (a no-op when batching is off)."""
        if self.max_size > 1 and self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def submit(self, item: T) -> R:
        """The outcome of ``item``, processed alone or in a batch with concurrent submissions.

        Raises:
            BatcherClosedError: the batcher is closed.
            Exception: whatever ``process`` reported for this item.
        """
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        if self._worker is None or self._queue is None:
            (outcome,) = await self._process([item])
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def aclose(self) -> None:
        """Stop the worker and fail the items still queued with ``BatcherClosedError``."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(BatcherClosedError("the server is shutting down"))

    async def _process(self, items: list[T]) -> list[R | BaseException]:
        if self.on_batch is not None:
            self.on_batch(len(items))
        outcomes = await anyio.to_thread.run_sync(self.process, items)
        if len(outcomes) != len(items):
            raise RuntimeError(f"batch processing returned {len(outcomes)} outcomes for {len(items)} items")
        return outcomes

    async def _collect(self, queue: asyncio.Queue[tuple[T, asyncio.Future[R]]]) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop abandoned requests

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = await self._collect(self._queue)
            if not batch:
                continue
            futures = [future for _, future in batch]
            try:
                outcomes = await self._process([item for item, _ in batch])
            except asyncio.CancelledError:
                for future in futures:
                    if not future.done():
                        future.set_exception(BatcherClosedError("the server is shutting down"))
                raise
            except Exception as exc:  # a failure of the whole batch: every caller gets it
                logger.exception("query batch of %d failed", len(batch))
                outcomes = [exc] * len(batch)
            for future, outcome in zip(futures, outcomes, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
