"""Bulk loading skips and reports corrupt files instead of aborting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from retrieval.data.datasets import CsvImageDataset
from retrieval.data.images import SkipReport
from retrieval.data.skipping import SkipCorrupt, collate_skipping, report_skipped
from retrieval.data.synthetic import SyntheticConfig, write_synthetic
from retrieval.data.transforms import PreprocessConfig, build_transforms

TINY = SyntheticConfig(
    image_size=24, train_per_class=1, val_per_class=1, test_per_class=1, num_colours=1, test_combos_per_shape=1
)


@pytest.fixture()
def damaged(tmp_path) -> CsvImageDataset:
    """The tiny synthetic test split on disk with one truncated, one non-image and one missing file."""
    csv_path = write_synthetic(TINY, tmp_path)["test"]
    ds = CsvImageDataset(csv_path)
    data = ds.paths[1].read_bytes()
    ds.paths[1].write_bytes(data[: len(data) // 2])  # truncated PNG
    ds.paths[4].write_text("definitely not a png")
    ds.paths[6].unlink()
    return ds.with_transform(build_transforms(PreprocessConfig(input_size=16), train=False))


def test_items_carry_a_reason_instead_of_raising(damaged) -> None:
    wrapped = SkipCorrupt(damaged)
    assert len(wrapped) == len(damaged) == 12
    index, tensor, reason = wrapped[0]
    assert index == 0 and tensor.shape == (3, 16, 16) and reason is None
    index, tensor, reason = wrapped[6]
    assert index == 6 and tensor is None and reason == "file not found"
    assert wrapped[4][2] == "not a recognised image format"


def test_loader_skips_and_reports(damaged, tmp_path) -> None:
    loader = DataLoader(SkipCorrupt(damaged), batch_size=5, collate_fn=collate_skipping)
    kept, skipped = [], []
    for indices, images, batch_skipped in loader:
        assert images is not None and images.shape == (len(indices), 3, 16, 16)
        assert indices.dtype == torch.long
        kept.extend(indices.tolist())
        skipped.extend(batch_skipped)
    assert [i for i, _ in skipped] == [1, 4, 6]
    assert kept == [i for i in range(12) if i not in (1, 4, 6)]
    report = report_skipped(damaged, skipped)
    assert isinstance(report, SkipReport) and len(report) == 3
    assert report.skipped[2] == (str(damaged.paths[6]), "file not found")
    report.write(tmp_path / "skipped.tsv")
    assert str(damaged.paths[1]) in (tmp_path / "skipped.tsv").read_text()


def test_all_skipped_batch_has_no_images() -> None:
    indices, images, skipped = collate_skipping([(3, None, "empty file"), (4, None, "file not found")])
    assert indices.tolist() == [] and images is None
    assert skipped == [(3, "empty file"), (4, "file not found")]


def test_needs_a_tensor_transform(damaged) -> None:
    with pytest.raises(ValueError, match="transform"):
        SkipCorrupt(damaged.with_transform(None))
    explicit = SkipCorrupt(damaged.with_transform(None), build_transforms(PreprocessConfig(input_size=8), False))
    assert explicit[0][1].shape == (3, 8, 8)


def test_preprocessing_failure_is_a_skip(damaged) -> None:
    def broken(image):
        raise ValueError("unsupported mode")

    assert SkipCorrupt(damaged, broken)[0] == (0, None, "preprocessing failed: unsupported mode")
