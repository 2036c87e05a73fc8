"""The training batch stream as a pure function of the step: what makes resuming bit-exact.

Step ``t`` always trains on the same images with the same augmentations, whether the run went
straight through or was stopped and resumed, and whatever the number of DataLoader workers:

* the batch indices come from ``PKBatchSampler`` at epoch ``t // batches_per_epoch``, position
  ``t % batches_per_epoch`` (the sampler is a pure function of ``(seed, epoch)``);
* each image's random augmentation runs under its own torch seed derived from ``(seed, t, slot)``,
  so it depends neither on which worker loads it nor on what that worker loaded before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from retrieval.data.sampler import PKBatchSampler

__all__ = ["SeededSamples", "step_batches"]


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


def step_batches(sampler: PKBatchSampler, start_step: int, seed: int) -> Iterator[list[tuple[int, int]]]:
    """Endless batches of ``(index, augmentation seed)`` pairs for steps ``start_step, start_step + 1, ...``.

    Use it as a DataLoader ``batch_sampler`` over :class:`SeededSamples`.
    """
    per_epoch = len(sampler)
    epoch, position = divmod(start_step, per_epoch)
    step = start_step
    while True:
        sampler.set_epoch(epoch)
        for batch in itertools.islice(iter(sampler), position, None):
            seeds = np.random.SeedSequence([seed, step]).generate_state(len(batch), dtype=np.uint64)
            yield [(int(i), int(s) & 0x7FFF_FFFF_FFFF_FFFF) for i, s in zip(batch, seeds, strict=True)]
            step += 1
        epoch, position = epoch + 1, 0
