"""The training batch stream as a pure function of the step: what makes resuming bit-exact.

Step ``t`` always trains on the same images with the same augmentations, whether the run went
straight through or was stopped and resumed, and whatever the number of DataLoader workers:

* the batch indices come from ``PKBatchSampler`` at epoch ``t // batches_per_epoch``, position
  ``t % batches_per_epoch`` (the sampler is a pure function of ``(seed, epoch)``);
* each image's random augmentation runs under its own torch seed derived from ``(seed, t, slot)``,
  so it depends neither on which worker loads it nor on what that worker loaded before.

Aspect-ratio batches (``sampler.kind: aspect``) keep both properties. The
:class:`~retrieval.data.sampler.AspectRatioBatchSampler` is a pure function of ``(seed, epoch)`` like the
P x K one; ``step_batches(..., shape_of=...)`` appends the batch's joint ``(height, width)`` to every key
(a function of the batch's indices only, computed in the main process), and :class:`JointlyResizedSamples`
hands that size to :class:`AspectTrainTransform`, so every image of the batch comes out at the same size
and the default collate stacks them into one tensor. The P x K path is untouched: without ``shape_of``
the keys and the pipeline are exactly as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from retrieval.data.datasets import LabelledImageDataset
from retrieval.data.sampler import AspectRatioBatchSampler, PKBatchSampler
from retrieval.data.transforms import AugmentConfig, PreprocessConfig, augment_steps, normalise_steps

__all__ = ["AspectTrainTransform", "JointlyResizedSamples", "MultiView", "SeededSamples", "WithIndex", "step_batches"]

#: ``batch indices -> (height, width)`` of the batch's joint input size.
ShapeOf = Callable[[list[int]], tuple[int, int]]


class SeededSamples(Dataset):
    """Dataset view indexed by ``(index, seed)``: item ``index`` transformed under torch seed ``seed``.

    The seed is applied inside ``torch.random.fork_rng``, so the caller's global RNG is left as it was
    (this matters when loading happens in the training process, ``num_workers=0``).
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def step_batches(
    sampler: PKBatchSampler | AspectRatioBatchSampler, start_step: int, seed: int, *, shape_of: ShapeOf | None = None
) -> Iterator[list[tuple[int, ...]]]:
    """Endless batches of ``(index, augmentation seed)`` pairs for steps ``start_step, start_step + 1, ...``.

    Use it as a DataLoader ``batch_sampler`` over :class:`SeededSamples`. With ``shape_of`` (aspect-ratio
    batches), every key becomes ``(index, seed, height, width)`` with the batch's joint size, for
    :class:`JointlyResizedSamples`; the indices and seeds are the same as without it.
    """
    per_epoch = len(sampler)
    epoch, position = divmod(start_step, per_epoch)
    step = start_step
    while True:
        sampler.set_epoch(epoch)
        for batch in itertools.islice(iter(sampler), position, None):
            seeds = np.random.SeedSequence([seed, step]).generate_state(len(batch), dtype=np.uint64)
            keys = [(int(i), int(s) & 0x7FFF_FFFF_FFFF_FFFF) for i, s in zip(batch, seeds, strict=True)]
            if shape_of is not None:
                height, width = shape_of(batch)
                keys = [(*key, int(height), int(width)) for key in keys]
            yield keys
            step += 1
        epoch, position = epoch + 1, 0


class AspectTrainTransform:
    """The training augmentation for aspect-ratio batches: ``(PIL image, (height, width)) -> tensor``.

    Geometry first, at the batch's joint size: a random resized crop straight to ``(height, width)`` whose
    crop-box ratio is drawn from ``augment.ratio`` around the target ratio ``width / height`` (so a photo
    keeps roughly its own proportions, the point of grouping by ratio, and is not squashed to a square),
    covering ``[augment.scale_min, 1]`` of the image. Then the same flip and colour jitter as the square
    pipeline (``retrieval.data.transforms``), and the encoder's normalisation. One pipeline is built per
    size and kept; it is picklable for DataLoader workers.

    Args:
        preprocess: the encoder's preprocessing (mean and std; its ``input_size`` is the batches' long side).
        augment: augmentation strength (the recipe's ``augment`` section).
    """

    def __init__(self, preprocess: PreprocessConfig, augment: AugmentConfig | None = None) -> None:
        self.preprocess = preprocess
        self.augment = augment or AugmentConfig()
        self._pipelines: dict[tuple[int, int], v2.Compose] = {}

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        size = (int(size[0]), int(size[1]))
        pipeline = self._pipelines.get(size)
        if pipeline is None:
            pipeline = self._pipelines[size] = self._build(size)
        return pipeline(image)

    def _build(self, size: tuple[int, int]) -> v2.Compose:
        aug, ratio = self.augment, size[1] / size[0]
        geometry = augment_steps(aug, size, ratio=(ratio * aug.ratio[0], ratio * aug.ratio[1]))
        return v2.Compose([*geometry, *normalise_steps(self.preprocess)])


class JointlyResizedSamples(Dataset):
    """Dataset view indexed by ``(index, seed, height, width)``: item ``index`` at the batch's joint size.

    The image is decoded untransformed, then :class:`AspectTrainTransform` runs under torch seed ``seed``
    (inside ``torch.random.fork_rng``, as in :class:`SeededSamples`), so an item depends only on its key.
    """

    def __init__(self, dataset: LabelledImageDataset, transform: Callable[[Image.Image, tuple[int, int]], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[Any, torch.Tensor]:
        index, seed, height, width = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self.transform(self.dataset.load_image(index), (height, width))
        return image, torch.from_numpy(self.dataset.labels[index].copy())


class MultiView:
    """A training transform applied ``views`` times to one image: ``(views, 3, H, W)``, each its own augmentation.

    What DM²'s view diversity feeds a cohort (one view per model). The views are drawn one after the other from
    the item's seeded RNG (:class:`SeededSamples`), so they are reproducible, and the first is exactly the image
    the plain transform would have produced. Picklable for DataLoader workers.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], views: int) -> None:
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        self.transform = transform
        self.views = views

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.views)])


class WithIndex(Dataset):
    """Dataset view over a keyed view (:class:`SeededSamples`, :class:`JointlyResizedSamples`) that appends the
    item's dataset position to what it returns: ``(image, labels, index)``.

    Objectives that look a batch up in a per-image table (the teacher's cached embeddings in distillation)
    need the positions; appending them draws nothing from any RNG, so the batches are otherwise unchanged.
    """

    def __init__(self, samples: Dataset) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, ...]) -> tuple[Any, ...]:
        return (*self.samples[key], int(key[0]))
