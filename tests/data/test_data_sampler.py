"""PKBatchSampler: P classes x K images per batch, a pure function of (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from retrieval.data.sampler import HierarchicalPKSampler, PKBatchSampler

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


# --------------------------------------------------------------------------- hierarchical sampling


def _tree_labels() -> np.ndarray:
    """24 fine classes x 5 images; fine f has middle f // 4 (6 middle classes) and coarse f // 12."""
    fine = np.repeat(np.arange(24), 5)
    return np.stack([fine, fine // 4, fine // 12], axis=1)


@pytest.mark.parametrize(("siblings", "parent_level"), [(2, 1), (4, 1), (3, 2)])
def test_hierarchical_batches_group_fine_classes_by_parent(siblings, parent_level) -> None:
    labels = _tree_labels()
    sampler = HierarchicalPKSampler(
        labels, classes_per_batch=6, images_per_class=3, siblings=siblings, parent_level=parent_level, num_batches=30
    )
    for batch in sampler:
        blocks = labels[batch].reshape(6, 3, 3)
        assert (blocks[:, :, 0] == blocks[:, :1, 0]).all()  # K images of one fine class
        fine = blocks[:, 0, 0]
        assert len(set(fine.tolist())) == 6
        parents = blocks[:, 0, parent_level]
        groups = [parents[i : i + siblings] for i in range(0, 6, siblings)]
        for group in groups:  # each group of `siblings` consecutive fine classes shares its parent
            assert len(set(group.tolist())) == 1
        assert len(set(parents.tolist())) == len(groups) or parent_level == 2  # coarse has only 2 classes


def test_hierarchical_sampler_is_deterministic_and_visits_every_class() -> None:
    labels = _tree_labels()

    def epoch(seed: int, number: int) -> list[list[int]]:
        sampler = HierarchicalPKSampler(labels, 4, 2, siblings=2, num_batches=12, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 0) != epoch(0, 1) and epoch(0, 0) != epoch(1, 0)
    seen = {int(labels[i, 0]) for batch in epoch(0, 0) for i in batch}
    assert seen == set(range(24))  # 12 batches x 4 classes = 48 slots cover all 24 classes


def test_parents_with_few_children_fill_the_batch_from_others() -> None:
    fine = np.repeat(np.arange(5), 3)
    labels = np.stack([fine, np.array([0, 0, 0, 0, 1])[fine]], axis=1)  # parent 1 has a single fine class
    sampler = HierarchicalPKSampler(labels, classes_per_batch=5, images_per_class=2, siblings=3, num_batches=10)
    for batch in sampler:
        assert sorted(set(labels[batch, 0].tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "make",
    [
        lambda rank, world: PKBatchSampler(
            _tree_labels()[:, 0], 4, 2, num_batches=5, seed=3, rank=rank, world_size=world
        ),
        lambda rank, world: HierarchicalPKSampler(
            _tree_labels(), 4, 2, num_batches=5, seed=3, rank=rank, world_size=world
        ),
    ],
)
def test_distributed_ranks_split_the_single_process_stream(make) -> None:
    single = list(_with_batches(make(0, 1), 15))  # one process drawing all 15 batches
    shards = [list(make(rank, 3)) for rank in range(3)]
    assert all(len(shard) == 5 for shard in shards)
    interleaved = [shards[i % 3][i // 3] for i in range(15)]
    assert interleaved == single


def _with_batches(sampler, count):
    sampler.num_batches = count  # a single process running the whole epoch of all ranks
    return sampler


def test_hierarchical_sampler_rejects_bad_setups() -> None:
    labels = _tree_labels()
    with pytest.raises(ValueError, match="siblings"):
        HierarchicalPKSampler(labels, 4, 2, siblings=5)
    with pytest.raises(ValueError, match="parent level"):
        HierarchicalPKSampler(labels[:, 0], 4, 2)
    with pytest.raises(ValueError, match="nest"):
        HierarchicalPKSampler(np.array([[0, 0], [0, 1], [1, 1]]), 2, 1)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(labels[:, 0], 4, 2, rank=2, world_size=2)
