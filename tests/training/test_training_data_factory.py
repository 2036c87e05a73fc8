"""Datasets from the ``data`` section: synthetic in memory, or CSV files on disk."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.data.datasets import DatasetError
from retrieval.data.synthetic import SyntheticConfig, write_synthetic
from training.config import DataConfig
from training.data_factory import build_datasets

TINY = SyntheticConfig(
    seed=1,
    image_size=16,
    num_colours=2,
    num_textures=1,
    train_per_class=3,
    val_per_class=2,
    test_per_class=1,
    test_combos_per_shape=1,
)


def test_synthetic_source_gives_train_and_val_with_the_same_classes():
    train, val = build_datasets(DataConfig(source="synthetic", synthetic=TINY))
    assert val is not None
    assert train.schema.levels == val.schema.levels == ("fine", "middle", "coarse")
    assert len(train) == 3 * len(np.unique(train.labels[:, 0]))
    assert train.vocab.names[0] == val.vocab.names[0]  # val = fresh instances of the training classes


def test_csv_source_reads_written_files_and_selects_levels(tmp_path):
    files = write_synthetic(TINY, tmp_path)
    train, val = build_datasets(
        DataConfig(source="csv", train_csv=files["train"], val_csv=files["val"], levels=["fine", "coarse"])
    )
    assert val is not None and train.schema.levels == ("fine", "coarse")
    assert len(train) == 3 * train.vocab.num_classes(0)
    assert train.load_image(0).size == (16, 16)
    only_train, no_val = build_datasets(DataConfig(source="csv", train_csv=files["train"]))
    assert no_val is None and len(only_train) == len(train)
    with pytest.raises(DatasetError, match=r"missing\.csv"):
        build_datasets(DataConfig(source="csv", train_csv=tmp_path / "missing.csv"))
