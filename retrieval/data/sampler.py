"""P x K batch sampling: every batch holds P classes with K images each.

Metric-learning losses need positives inside the batch; a random batch over many classes has almost
none. Sampling P classes and K images per class guarantees ``K - 1`` positives per anchor. The order is
a pure function of ``(seed, epoch)`` so a resumed run replays the same batches.

:class:`HierarchicalPKSampler` also controls how the P fine classes relate: drawn in groups of siblings
that share a middle (or coarse) parent, a batch holds hard negatives at every level (two fine classes
of one middle class are the hardest fine negatives) instead of mostly unrelated classes.

Both shard the batch stream for distributed training: with ``world_size`` ranks, the global sequence
of ``num_batches * world_size`` batches is dealt out round-robin, so ranks never share a batch and
their union is exactly the single-process stream.

:class:`AspectRatioBatchSampler` serves classification losses (ArcFace on landmarks) that need no
positives in the batch: it groups images of similar aspect ratio so that each batch can be resized
jointly to one non-square size (:func:`joint_size`) instead of squashing every photo to a square.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Sampler

from retrieval.config import ConfigError
from retrieval.data.datasets import InMemoryImageDataset, LabelledImageDataset
from retrieval.data.images import CorruptImageError

__all__ = [
    "AspectRatioBatchSampler",
    "HierarchicalPKSampler",
    "PKBatchSampler",
    "joint_size",
    "read_image_sizes",
]

logger = logging.getLogger(__name__)


class _ShardedBatchSampler(Sampler[list[int]]):
    """Epoch and rank bookkeeping shared by the batch samplers.

    Batches are a pure function of ``(seed, epoch)``; with ``world_size`` ranks each rank yields every
    ``world_size``-th batch of the global sequence, starting at its ``rank``.
    """

    def _init_stream(
        self, num_items: int, batch_size: int, num_batches: int | None, seed: int, rank: int, world_size: int
    ) -> None:
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size) with world_size >= 1, got rank={rank}, {world_size=}")
        self.batch_size = batch_size
        per_rank = num_items // (batch_size * world_size)
        self.num_batches = num_batches if num_batches is not None else max(1, per_rank)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches


class PKBatchSampler(_ShardedBatchSampler):
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
        num_batches: batches per epoch and rank; default ``N // (P * K * world_size)`` (at least 1).
        seed: base seed; batches depend only on ``(seed, epoch)`` (and the rank).
        rank: this process's rank in distributed training (0-based).
        world_size: number of ranks sharing the stream.

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
        rank: int = 0,
        world_size: int = 1,
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
        self._init_stream(len(labels), classes_per_batch * images_per_class, num_batches, seed, rank, world_size)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self._pools: list[np.ndarray] = np.split(order, bounds)
        self.classes_per_batch = classes_per_batch
        self.images_per_class = images_per_class

    @property
    def num_classes(self) -> int:
        return len(self._pools)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        queues: list[deque[int]] = [deque() for _ in self._pools]
        choose = self._class_chooser(rng)
        for position in range(self.num_batches * self.world_size):
            chosen = choose()  # every rank draws every batch, so all ranks stay in step with one RNG stream
            batch = [index for c in chosen for index in self._draw(c, queues, rng)]
            if position % self.world_size == self.rank:
                yield batch

    def _class_chooser(self, rng: np.random.Generator) -> Callable[[], list[int]]:
        """A function returning the next batch's P distinct classes (indices into the class pools)."""
        class_queue: list[int] = []

        def choose() -> list[int]:
            nonlocal class_queue
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not class_queue:
                    class_queue = rng.permutation(self.num_classes).tolist()
                c = class_queue.pop()
                if c not in chosen:  # a class can straddle a reshuffle; never put it twice in one batch
                    chosen.append(c)
            return chosen

        return choose

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


class HierarchicalPKSampler(PKBatchSampler):
    """P fine classes x K images per batch, the fine classes drawn in groups of siblings.

    Each batch is built from groups: a parent class at ``parent_level`` is picked (parents in a shuffled
    round-robin), then up to ``siblings`` of its fine classes (its children in their own shuffled
    round-robin), until the batch has P fine classes. ``siblings=1`` gives P unrelated-by-construction
    classes; larger values give more fine negatives that share a middle/coarse class, the negatives
    that separate neighbouring levels. A parent with fewer fine classes than ``siblings`` gives all it has.
    Images are drawn per class as in :class:`PKBatchSampler`.

    Args:
        labels: ``(N, L)`` integer labels, finest first (the levels must nest).
        classes_per_batch: P, distinct fine classes per batch.
        images_per_class: K, images per fine class.
        siblings: fine classes per parent group (at most P).
        parent_level: label column whose classes group the fine classes (1 = middle, 2 = coarse...).
        num_batches, seed, rank, world_size: as for :class:`PKBatchSampler`.

    Raises:
        ValueError: labels not ``(N, L)`` with ``L > parent_level``, non-nesting labels, bad ``siblings``.
    """

    def __init__(
        self,
        labels: np.ndarray,
        classes_per_batch: int,
        images_per_class: int,
        siblings: int = 2,
        parent_level: int = 1,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 2 or not 0 < parent_level < labels.shape[1]:
            raise ValueError(
                f"labels must be (N, L) with a parent level in [1, L); got shape {labels.shape}, {parent_level=}"
            )
        if not 1 <= siblings <= classes_per_batch:
            raise ValueError(f"siblings must lie in [1, classes_per_batch={classes_per_batch}], got {siblings}")
        super().__init__(labels[:, 0], classes_per_batch, images_per_class, num_batches, seed, rank, world_size)
        fine_ids = np.unique(labels[:, 0])  # pool c holds fine class fine_ids[c]
        pairs = np.unique(labels[:, [0, parent_level]], axis=0)
        if len(pairs) != len(fine_ids):
            raise ValueError(f"labels do not nest: a fine class has several parents at level {parent_level}")
        parent_of_pool = pairs[np.searchsorted(pairs[:, 0], fine_ids), 1]
        parents, inverse = np.unique(parent_of_pool, return_inverse=True)
        self._children: list[np.ndarray] = [np.flatnonzero(inverse == p) for p in range(len(parents))]
        self.siblings = siblings
        self.parent_level = parent_level

    def _class_chooser(self, rng: np.random.Generator) -> Callable[[], list[int]]:
        parent_queue: list[int] = []
        child_queues: list[list[int]] = [[] for _ in self._children]

        def choose() -> list[int]:
            nonlocal parent_queue
            chosen: list[int] = []
            while len(chosen) < self.classes_per_batch:
                if not parent_queue:
                    parent_queue = rng.permutation(len(self._children)).tolist()
                parent = parent_queue.pop()
                wanted = min(self.siblings, self.classes_per_batch - len(chosen))
                chosen.extend(self._take_children(parent, wanted, child_queues, chosen, rng))
            return chosen

        return choose

    def _take_children(
        self, parent: int, wanted: int, queues: list[list[int]], chosen: list[int], rng: np.random.Generator
    ) -> list[int]:
        children = self._children[parent]
        available = [c for c in children.tolist() if c not in chosen]
        wanted = min(wanted, len(available))
        taken: list[int] = []
        refilled = False
        while len(taken) < wanted:
            if not queues[parent]:
                if refilled:  # every available child was already tried in this call
                    break
                queues[parent] = rng.permutation(children).tolist()
                refilled = True
            c = queues[parent].pop()
            if c not in chosen and c not in taken:
                taken.append(c)
        return taken


def joint_size(aspect_ratio: float, long_side: int, multiple: int = 32) -> tuple[int, int]:
    """The ``(height, width)`` a batch of images with this median ``width / height`` is resized to.

    The long side is ``long_side`` (the training resolution); the short side follows the ratio, rounded to
    a multiple of ``multiple`` (the backbone's stride, so the feature map has no ragged border) and kept
    within ``[multiple, long_side]``. A ratio of 1 gives the square ``long_side x long_side`` input.

    Raises:
        ValueError: a non-positive ratio, side or multiple.
    """
    if not aspect_ratio > 0 or long_side < 1 or multiple < 1:
        raise ValueError(f"need a positive ratio, long side and multiple, got {aspect_ratio}, {long_side}, {multiple}")
    stretch = max(aspect_ratio, 1.0 / aspect_ratio)  # long / short, >= 1
    short = math.floor(long_side / stretch / multiple + 0.5) * multiple  # half rounds up
    short = min(max(short, min(multiple, long_side)), long_side)
    return (long_side, short) if aspect_ratio < 1 else (short, long_side)


def read_image_sizes(dataset: LabelledImageDataset, threads: int = 16) -> np.ndarray:
    """Each item's ``(width, height)`` as an int64 ``(N, 2)`` array, without decoding any file.

    File datasets (whose ``names`` are file paths) are read with PIL's lazy open, which parses only the
    header; the reads run on a few threads since they wait on the disk. In-memory datasets answer from
    the images they hold. Call it once and keep the result: GLDv2-clean takes minutes on a slow disk.

    Raises:
        CorruptImageError: a missing file or one PIL cannot identify (the message names it).
    """
    if isinstance(dataset, InMemoryImageDataset):
        return np.array([dataset.load_image(i).size for i in range(len(dataset))], dtype=np.int64).reshape(-1, 2)
    if len(dataset) > 10_000:
        logger.info("reading the sizes of %d images from their headers", len(dataset))
    names = dataset.names
    chunks = [names[start : start + 1024] for start in range(0, len(names), 1024)]  # few futures, not one per image
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sizes = [size for chunk in pool.map(_header_sizes, chunks) for size in chunk]
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def _header_sizes(paths: list[str]) -> list[tuple[int, int]]:
    return [_header_size(path) for path in paths]


def _header_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as image:  # lazy: reads the header, decodes no pixel
            return image.size
    except FileNotFoundError:
        raise CorruptImageError(path, "file not found") from None
    except UnidentifiedImageError:
        raise CorruptImageError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CorruptImageError(path, str(exc) or type(exc).__name__) from None


class AspectRatioBatchSampler(_ShardedBatchSampler):
    """Yield batches of ``batch_size`` indices whose images have similar aspect ratios.

    Each epoch makes one pass over the images (more when ``num_batches`` asks for more): the ``N mod
    batch_size`` images left out of this pass are drawn at random, the rest are sorted by aspect ratio
    (ties broken at random, so equal-ratio images, the bulk of a photo collection, form new batches every
    epoch), cut into consecutive chunks, and the chunks are shuffled. So every image is seen once per
    epoch, a batch spans a narrow band of ratios, and the order of landscape, square and portrait
    batches is random. Labels play no part: this is for classification losses (ArcFace), not P x K.

    Batches are a pure function of ``(seed, epoch)``; distributed ranks take the global sequence
    round-robin, as in :class:`PKBatchSampler`. :meth:`batch_shape` gives the joint input size of a batch.

    Args:
        sizes: ``(N, 2)`` ``(width, height)`` of each item (:func:`read_image_sizes`), kept in memory.
        batch_size: images per batch (at most N).
        num_batches: batches per epoch and rank; default ``N // (batch_size * world_size)`` (at least 1).
        seed: base seed.
        rank: this process's rank in distributed training (0-based).
        world_size: number of ranks sharing the stream.

    Raises:
        ValueError: sizes not ``(N, 2)`` positive, or a bad batch size, ``num_batches``, rank or world size.
    """

    def __init__(
        self,
        sizes: np.ndarray | Sequence[tuple[int, int]],
        batch_size: int,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        sizes = np.asarray(sizes, dtype=np.float64)
        if sizes.ndim != 2 or sizes.shape[1] != 2 or len(sizes) == 0:
            raise ValueError(f"sizes must be a non-empty (N, 2) array of (width, height), got shape {sizes.shape}")
        if not (sizes > 0).all():
            raise ValueError("image sizes must be positive")
        if not 1 <= batch_size <= len(sizes):
            raise ConfigError(f"batch_size must lie in [1, {len(sizes)}] (the number of images), got {batch_size}")
        self._init_stream(len(sizes), batch_size, num_batches, seed, rank, world_size)
        self.ratios = sizes[:, 0] / sizes[:, 1]  # width / height

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        wanted = self.num_batches * self.world_size
        batches: list[list[int]] = []
        while len(batches) < wanted:
            batches.extend(self._one_pass(rng))
        for position in range(self.rank, wanted, self.world_size):
            yield batches[position]

    def _one_pass(self, rng: np.random.Generator) -> list[list[int]]:
        count = len(self.ratios) // self.batch_size * self.batch_size
        kept = rng.permutation(len(self.ratios))[:count]  # a random N mod batch_size images sit this pass out
        kept = kept[np.argsort(self.ratios[kept], kind="stable")]  # by ratio; ties keep the random order
        chunks = kept.reshape(-1, self.batch_size)
        return [chunks[i].tolist() for i in rng.permutation(len(chunks))]

    def batch_ratio(self, batch: Sequence[int]) -> float:
        """The median ``width / height`` of the batch's images."""
        return float(np.median(self.ratios[np.asarray(batch, dtype=np.int64)]))

    def batch_shape(self, batch: Sequence[int], long_side: int, multiple: int = 32) -> tuple[int, int]:
        """The ``(height, width)`` every image of ``batch`` is resized to (:func:`joint_size` of its median ratio)."""
        return joint_size(self.batch_ratio(batch), long_side, multiple)
