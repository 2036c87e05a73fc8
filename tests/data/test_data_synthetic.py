"""The synthetic hierarchical dataset: class counts, nesting, open-set split, determinism, files on disk."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.config import ConfigError, load_config
from retrieval.data.datasets import CsvImageDataset, DatasetError, open_dataset
from retrieval.data.synthetic import (
    SyntheticConfig,
    generate_split,
    generate_synthetic,
    split_classes,
    write_synthetic,
)

SMALL = SyntheticConfig(image_size=32, train_per_class=2, val_per_class=1, test_per_class=2, seed=7)


def _names(classes, level: str) -> set[str]:
    return {getattr(c, level) for c in classes}


def test_default_config_has_required_class_counts() -> None:
    cfg = SyntheticConfig()
    train, test = split_classes(cfg, "train"), split_classes(cfg, "test")
    every = train + test
    assert len(_names(every, "coarse")) >= 4 and len(_names(every, "middle")) >= 12 and len(_names(every, "fine")) >= 96
    assert len(train) == 72 and len(test) == 24 and split_classes(cfg, "val") == train
    assert _names(train, "fine").isdisjoint(_names(test, "fine"))  # open-set at the fine level
    assert _names(train, "middle") == _names(test, "middle") and _names(train, "coarse") == _names(test, "coarse")
    colours = {c.fine.split("-")[-2] for c in train}
    textures = {c.fine.split("-")[-1] for c in train}
    assert colours == {"red", "orange", "green", "teal"} and textures == {"solid", "striped"}
    assert {c.fine.split("-")[-2] for c in test} == colours  # held-out combinations rotate over shapes


def test_names_are_readable_and_nest() -> None:
    classes = split_classes(SyntheticConfig(num_colours=8, num_textures=5, test_combos_per_shape=3), "train")
    assert len(classes) == 12 * (40 - 3)
    triangle = next(c for c in classes if c.middle == "triangle")
    assert triangle.coarse == "polygon" and triangle.fine.startswith("triangle-")
    parents = {}
    for c in classes:
        assert parents.setdefault(c.fine, (c.middle, c.coarse)) == (c.middle, c.coarse)


def test_generated_splits_shapes_labels_and_hierarchy() -> None:
    splits = generate_synthetic(SMALL)
    for name, ds in splits.as_dict().items():
        per_class = SMALL.per_class(name)
        assert ds.images.shape == (len(ds), 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.schema.levels == ("fine", "middle", "coarse")
        ds.schema.check_hierarchy(ds.labels)
        assert np.bincount(ds.labels[:, 0]).tolist() == [per_class] * ds.vocab.num_classes("fine")
        assert ds.load_image(0).size == (32, 32)
        assert ds.names[0].startswith(f"{name}/") and ds.label_names(0)["fine"] in ds.names[0]
    train, test = splits.train, splits.test
    assert set(train.vocab.names[0]).isdisjoint(test.vocab.names[0])
    assert train.vocab.names[1:] == test.vocab.names[1:]  # middle/coarse ids agree across splits
    assert set(test.labels[:, 2].tolist()) == set(range(4))
    assert len(np.unique(train.images.reshape(len(train), -1), axis=0)) == len(train)  # all instances differ


def test_deterministic_and_independent_per_split() -> None:
    a = generate_split(SMALL, "test")
    b = generate_synthetic(SMALL).test
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    other_seed = generate_split(SMALL.model_copy(update={"seed": 8}), "test")
    assert not np.array_equal(a.images, other_seed.images)
    more = generate_split(SMALL.model_copy(update={"test_per_class": 3}), "test")
    assert np.array_equal(more.images[[0, 1, 3, 4]], a.images[:4])  # raising the count keeps existing instances
    val = generate_split(SMALL, "val")
    train = generate_split(SMALL, "train")
    assert not np.array_equal(val.images[0], train.images[0])  # same class, fresh instance


def test_near_colours_stay_apart_under_jitter() -> None:
    cfg = SMALL.model_copy(update={"train_per_class": 6, "num_textures": 1, "test_combos_per_shape": 1})
    ds = generate_split(cfg, "train")
    # mean colour of the most saturated pixels, per image: red vs orange separated by the green channel
    fine = np.array(ds.vocab.names[0])[ds.labels[:, 0]]
    rgb = ds.images.reshape(len(ds), -1, 3).astype(float)
    sat = rgb.max(axis=2) - rgb.min(axis=2)
    top = np.take_along_axis(rgb, np.argsort(-sat, axis=1)[:, :40, None], axis=1).mean(axis=1)
    green = {c: top[[f.endswith(f"-{c}-solid") for f in fine], 1].mean() for c in ("red", "orange")}
    assert green["orange"] > green["red"] + 40


def test_write_and_read_back(tmp_path) -> None:
    cfg = SMALL.model_copy(update={"num_colours": 2, "num_textures": 1, "test_combos_per_shape": 1})
    csvs = write_synthetic(cfg, tmp_path / "synth")
    assert set(csvs) == {"train", "val", "test"}
    assert (tmp_path / "synth" / "synthetic.yaml").is_file()
    assert load_config(SyntheticConfig, tmp_path / "synth" / "synthetic.yaml") == cfg
    header = csvs["train"].read_text().splitlines()[:2]
    assert header[0] == "path,fine,middle,coarse" and header[1].startswith("triangle-")
    memory = generate_split(cfg, "test")
    disk = open_dataset(tmp_path / "synth" / "test")
    assert isinstance(disk, CsvImageDataset) and len(disk) == len(memory)
    assert np.array_equal(disk.labels, memory.labels)
    assert [disk.label_names(i) for i in range(len(disk))] == [memory.label_names(i) for i in range(len(memory))]
    for i in (0, len(disk) - 1):
        assert np.array_equal(np.asarray(disk.load_image(i)), memory.images[i])  # PNG is lossless
    with pytest.raises(DatasetError, match="already exists"):
        write_synthetic(cfg, tmp_path / "synth")
    write_synthetic(cfg, tmp_path / "synth", overwrite=True)


def test_jpeg_output(tmp_path) -> None:
    cfg = SMALL.model_copy(update={"num_colours": 1, "num_textures": 1, "test_combos_per_shape": 0})
    csvs = write_synthetic(cfg.model_copy(update={"image_format": "jpg"}), tmp_path)
    ds = CsvImageDataset(csvs["val"])
    assert ds.names[0].endswith(".jpg") and ds.load_image(0).size == (32, 32)
    # closed-set test split when nothing is held out
    assert CsvImageDataset(csvs["test"]).vocab.names[0] == CsvImageDataset(csvs["train"]).vocab.names[0]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num_colours=9", "num_colours"),
        ("test_combos_per_shape=8", "leaves no training class"),
        ("scale_range=[0.3,0.2]", "scale_range"),
        ("colours=3", "colours"),
    ],
)
def test_config_validation(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(SyntheticConfig, overrides=[override])
