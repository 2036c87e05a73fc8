"""P x K batch sampling: every batch holds P classes with K images each.

Metric-learning losses need positives inside the batch; a random batch over many classes has almost
none. Sampling P classes and K images per class guarantees ``K - 1`` positives per anchor. The order is
a pure function of ``(seed, epoch)`` so a resumed run replays the same batches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from retrieval.config import ConfigError

__all__ = ["PKBatchSampler"]


class PKBatchSampler(Sampler[list[int]]):
    """Yield batches of ``classes_per_batch * images_per_class`` dataset indices.

    Classes are visited in a shuffled round-robin (each class appears once before any appears twice), and
    within a class images are drawn from a shuffled queue, so over an epoch every image is seen about
    equally often. A class with fewer than ``images_per_class`` images contributes all of them plus
    repeats drawn with replacement.

    Use it as a DataLoader ``batch_sampler`` and call :meth:`set_epoch` before each epoch; iterating twice
    without changing the epoch replays the same batches.

    Args:
        labels: ``(N,)`` integer class of each item at the level used for sampling (usually the finest).
        classes_per_batch: P, distinct classes per batch.
        images_per_class: K, images per class in a batch.
        num_batches: batches per epoch; default ``N // (P * K)`` (at least 1).
        seed: base seed; batches depend only on ``(seed, epoch)``.

    Raises:
        ValueError: labels are not 1-D or empty, P or K < 1, or P exceeds the number of classes.
    """

    def __init__(
        self,
        labels: np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (one class per item; pass labels[:, level]), got {labels.shape}")
        if len(labels) == 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if classes_per_batch < 1 or images_per_class < 1:
            raise ValueError(
                f"classes_per_batch and images_per_class must be >= 1, got {classes_per_batch}, {images_per_class}"
            )
        classes, inverse = np.unique(labels, return_inverse=True)
        if classes_per_batch > len(classes):
            raise ConfigError(f"classes_per_batch={classes_per_batch} exceeds the number of classes ({len(classes)})")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self._pools: list[np.ndarray] = np.split(order, bounds)
        self.classes_per_batch = classes_per_batch
        self.images_per_class = images_per_class
        self.batch_size = classes_per_batch * images_per_class
        self.num_batches = num_batches if num_batches is not None else max(1, len(labels) // self.batch_size)
        self.seed = seed
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self._pools)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: list[deque[int]] = [deque() for _ in self._pools]
        class_queue: list[int] = []
        for _ in range(self.num_batches):
            batch: list[int] = []
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not class_queue:
                    class_queue = rng.permutation(self.num_classes).tolist()
                c = class_queue.pop()
                if c not in chosen:  # a class can straddle a reshuffle; never put it twice in one batch
                    chosen.append(c)
            for c in chosen:
                batch.extend(self._draw(c, queues, rng))
            yield batch

    def _draw(self, c: int, queues: list[deque[int]], rng: np.random.Generator) -> list[int]:
        pool, k = self._pools[c], self.images_per_class
        if len(pool) < k:
            extra = rng.choice(pool, size=k - len(pool), replace=True)
            return rng.permutation(np.concatenate([pool, extra])).tolist()
        queue = queues[c]
        taken: list[int] = []
        deferred: list[int] = []
        while len(taken) < k:
            if not queue:  # the queue is a run of whole permutations: each image once per cycle
                queue.extend(rng.permutation(pool).tolist())
            index = queue.popleft()
            (deferred if index in taken else taken).append(index)  # never twice in one batch
        queue.extendleft(reversed(deferred))
        return taken
