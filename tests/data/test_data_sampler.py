"""PKBatchSampler: P classes x K images per batch, a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from retrieval.data.sampler import PKBatchSampler

SIZES = [1, 2, 3, 5, 8, 13, 4, 4, 4, 6]


@pytest.fixture()
def labels() -> np.ndarray:
    return np.random.default_rng(0).permutation(np.repeat(np.arange(10) * 7, SIZES))  # sparse class ids


def test_batches_hold_p_classes_of_k_images(labels) -> None:
    sampler = PKBatchSampler(labels, classes_per_batch=4, images_per_class=3, num_batches=40, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 40
    for batch in batches:
        assert len(batch) == 12
        blocks = labels[batch].reshape(4, 3)
        assert (blocks == blocks[:, :1]).all()  # consecutive K indices share a class
        assert len(set(blocks[:, 0].tolist())) == 4  # P distinct classes
        for c in blocks[:, 0]:  # no repeats within a class unless it has fewer than K images
            members = [i for i in batch if labels[i] == c]
            assert len(set(members)) == min(3, int((labels == c).sum()))


def test_small_classes_are_sampled_with_replacement(labels) -> None:
    sampler = PKBatchSampler(labels, classes_per_batch=10, images_per_class=4, num_batches=2)
    singleton = int(np.flatnonzero(labels == 0)[0])  # class 0 has one image
    for batch in sampler:
        assert batch.count(singleton) == 4


def test_deterministic_per_seed_and_epoch(labels) -> None:
    a = PKBatchSampler(labels, 3, 2, seed=5)
    b = PKBatchSampler(labels, 3, 2, seed=5)
    first = list(a)
    assert first == list(b) == list(a)  # replays until the epoch changes
    a.set_epoch(1)
    b.set_epoch(1)
    second = list(a)
    assert second == list(b) and second != first
    assert list(PKBatchSampler(labels, 3, 2, seed=6)) != first


def test_default_length_and_even_coverage(labels) -> None:
    sampler = PKBatchSampler(labels, classes_per_batch=5, images_per_class=2)
    assert len(sampler) == len(labels) // 10
    counts = np.bincount(np.concatenate(list(PKBatchSampler(labels, 5, 2, num_batches=400))), minlength=len(labels))
    for c in np.unique(labels):
        members = counts[labels == c]
        assert members.max() - members.min() <= 1  # images of a class are drawn from a shuffled queue


def test_works_as_dataloader_batch_sampler(labels) -> None:
    data = TensorDataset(torch.arange(len(labels)), torch.from_numpy(labels))
    loader = DataLoader(data, batch_sampler=PKBatchSampler(labels, 2, 3, num_batches=3))
    batches = list(loader)
    assert len(batches) == 3 and all(x.shape == (6,) and len(torch.unique(y)) == 2 for x, y in batches)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes_per_batch": 11, "images_per_class": 2}, "exceeds the number of classes"),
        ({"classes_per_batch": 0, "images_per_class": 2}, ">= 1"),
        ({"classes_per_batch": 2, "images_per_class": 2, "num_batches": 0}, "num_batches"),
    ],
)
def test_invalid_arguments(labels, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(labels, **kwargs)


def test_rejects_two_dimensional_or_empty_labels(labels) -> None:
    with pytest.raises(ValueError, match="1-D"):
        PKBatchSampler(np.stack([labels, labels], axis=1), 2, 2)
    with pytest.raises(ValueError, match="empty"):
        PKBatchSampler(np.array([], dtype=np.int64), 2, 2)
