"""AspectRatioBatchSampler: batches of similar aspect ratio, a pure function of (seed, epoch), sharded by rank."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.data.datasets import CsvImageDataset, InMemoryImageDataset
from retrieval.data.images import CorruptImageError
from retrieval.data.labels import LabelSchema, LabelVocabulary
from retrieval.data.sampler import AspectRatioBatchSampler, joint_size, read_image_sizes

# Three ratio families (landscape 4:3 and 2:1, square, portrait 3:4), 24 images each, in a shuffled order.
FAMILIES = [(640, 480), (512, 256), (500, 500), (480, 640)]


@pytest.fixture()
def sizes() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = np.repeat(np.array(FAMILIES), 24, axis=0)
    jitter = rng.integers(-6, 7, size=base.shape)  # ratios within a family differ a little
    return rng.permutation(base + jitter)


def test_a_batch_spans_a_narrow_band_of_ratios(sizes):
    sampler = AspectRatioBatchSampler(sizes, batch_size=8, seed=1)
    ratios = sizes[:, 0] / sizes[:, 1]
    families = np.argmin(np.abs(np.log(ratios)[:, None] - np.log([w / h for w, h in FAMILIES])[None]), axis=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 12
    for batch in batches:
        assert len(batch) == 8
        assert len(set(families[batch].tolist())) == 1  # 24 images per family, 8 per batch: never mixed
        assert ratios[batch].max() / ratios[batch].min() < 1.06


def test_every_image_once_per_epoch_and_batches_reshuffle(sizes):
    sampler = AspectRatioBatchSampler(sizes, batch_size=8, seed=1)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        flat = [i for batch in sampler for i in batch]
        assert sorted(flat) == list(range(len(sizes)))
        epochs.append(list(sampler))
    assert epochs[0] != epochs[1] != epochs[2]
    # ties (equal ratios) are broken at random, so the same-ratio images form new groups every epoch
    square = AspectRatioBatchSampler(np.full((16, 2), 100), batch_size=4, seed=1)
    groups = []
    for epoch in range(2):
        square.set_epoch(epoch)
        groups.append({frozenset(batch) for batch in square})
    assert groups[0] != groups[1]


def test_batches_are_a_pure_function_of_seed_and_epoch(sizes):
    a = AspectRatioBatchSampler(sizes, batch_size=8, seed=5)
    b = AspectRatioBatchSampler(sizes, batch_size=8, seed=5)
    a.set_epoch(3)
    b.set_epoch(0)
    list(b)  # iterating another epoch first changes nothing
    b.set_epoch(3)
    assert list(a) == list(b) == list(a)
    other = AspectRatioBatchSampler(sizes, batch_size=8, seed=6)
    other.set_epoch(3)
    assert list(other) != list(a)


def test_leftover_images_rotate_and_extra_batches_take_more_passes(sizes):
    sampler = AspectRatioBatchSampler(sizes[:30], batch_size=8, seed=2)  # 3 batches, 6 images sit out
    left_out = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler for i in batch]
        assert len(seen) == len(set(seen)) == 24
        left_out |= set(range(30)) - set(seen)
    assert len(left_out) > 6  # not always the same six
    longer = AspectRatioBatchSampler(sizes[:30], batch_size=8, num_batches=7, seed=2)
    batches = list(longer)
    assert len(batches) == 7 and all(len(b) == 8 for b in batches)
    assert batches[:3] == list(AspectRatioBatchSampler(sizes[:30], batch_size=8, seed=2))  # the first pass as before


def test_ranks_deal_the_global_sequence_round_robin(sizes):
    single = AspectRatioBatchSampler(sizes, batch_size=8, num_batches=12, seed=3)
    ranks = [AspectRatioBatchSampler(sizes, batch_size=8, seed=3, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in ranks] == [4, 4, 4]
    for sampler in [single, *ranks]:
        sampler.set_epoch(2)
    streams = [list(s) for s in ranks]
    merged = [streams[p % 3][p // 3] for p in range(12)]
    assert merged == list(single)
    flat = [i for stream in streams for batch in stream for i in batch]
    assert len(flat) == len(set(flat)) == len(sizes)  # ranks never share an image within an epoch


def test_joint_size_keeps_the_long_side_and_rounds_the_short_one():
    assert joint_size(1.0, 512) == (512, 512)
    assert joint_size(4 / 3, 512) == (384, 512)  # (height, width)
    assert joint_size(3 / 4, 512) == (512, 384)
    assert joint_size(2.0, 64) == (32, 64)
    assert joint_size(1.2, 64) == (64, 64)  # 53.3 px rounds to 64, a multiple of 32
    assert joint_size(1.4, 64) == (32, 64)  # 45.7 px rounds to 32
    assert joint_size(10.0, 512) == (64, 512)  # 51 px rounds to 64
    assert joint_size(100.0, 512) == (32, 512)  # never below one multiple
    assert joint_size(3.0, 16) == (16, 16)  # a long side below the multiple stays square
    with pytest.raises(ValueError, match="positive"):
        joint_size(0.0, 512)


def test_batch_shape_uses_the_batch_median_ratio():
    sampler = AspectRatioBatchSampler([(64, 32), (60, 32), (70, 32), (32, 64)], batch_size=2)
    assert sampler.batch_ratio([0, 1, 2]) == pytest.approx(2.0)
    assert sampler.batch_shape([0, 1, 2], long_side=64) == (32, 64)
    assert sampler.batch_shape([3], long_side=64) == (64, 32)


def test_bad_arguments_are_refused(sizes):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        AspectRatioBatchSampler(np.zeros((0, 2)), batch_size=1)
    with pytest.raises(ValueError, match="positive"):
        AspectRatioBatchSampler([(10, 0)], batch_size=1)
    with pytest.raises(ValueError, match="batch_size"):
        AspectRatioBatchSampler(sizes, batch_size=len(sizes) + 1)
    with pytest.raises(ValueError, match="rank"):
        AspectRatioBatchSampler(sizes, batch_size=8, rank=2, world_size=2)


def test_sizes_come_from_file_headers_or_memory(tmp_path):
    for name, size in (("a.png", (30, 10)), ("b.jpg", (8, 24))):
        Image.new("RGB", size).save(tmp_path / name)
    (tmp_path / "labels.csv").write_text("path,fine\na.png,x\nb.jpg,y\n")
    files = CsvImageDataset(tmp_path / "labels.csv")
    assert read_image_sizes(files).tolist() == [[30, 10], [8, 24]]
    assert read_image_sizes(files.subset([1])).tolist() == [[8, 24]]
    schema = LabelSchema(("fine",))
    memory = InMemoryImageDataset(
        [np.zeros((5, 7, 3), np.uint8)], np.zeros((1, 1)), schema, LabelVocabulary(schema, [["x"]]), ["m"]
    )
    assert read_image_sizes(memory).tolist() == [[7, 5]]
    (tmp_path / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=r"b\.jpg: not a recognised image format"):
        read_image_sizes(files)
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(CorruptImageError, match=r"b\.jpg: file not found"):
        read_image_sizes(files)
