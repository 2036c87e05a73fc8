"""CSV, image-folder and in-memory datasets: labels, lazy loading, views, and errors that name the file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.data.datasets import (
    UNLABELLED,
    CsvImageDataset,
    DatasetError,
    ImageFolderDataset,
    InMemoryImageDataset,
    open_dataset,
)
from retrieval.data.images import CorruptImageError
from retrieval.data.labels import LabelSchema, LabelVocabulary


def _png(path, value: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(path)


@pytest.fixture()
def csv_dir(tmp_path):
    rows = [
        ("a/1.png", "cat-tabby", "cat", "animal"),
        ("a/2.png", "cat-black", "cat", "animal"),
        ("b/3.png", "oak", "tree", "plant"),
        ("b/4.png", "cat-tabby", "cat", "animal"),
    ]
    for i, (path, *_rest) in enumerate(rows):
        _png(tmp_path / path, 40 * i)
    lines = ["path,split,fine,middle,coarse,extra"] + [
        f"{p},{'test' if i % 2 else 'train'},{f},{m},{c},x" for i, (p, f, m, c) in enumerate(rows)
    ]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_csv_dataset_labels_paths_and_items(csv_dir) -> None:
    ds = CsvImageDataset(csv_dir / "labels.csv")
    assert ds.schema.levels == ("fine", "middle", "coarse")
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (4, 3)
    assert ds.labels[:, 0].tolist() == [0, 1, 2, 0]  # first-seen order
    assert ds.label_names(2) == {"fine": "oak", "middle": "tree", "coarse": "plant"}
    assert ds.names[0] == os.path.abspath(csv_dir / "a" / "1.png")
    ds.schema.check_hierarchy(ds.labels)
    image, labels = ds[3]
    assert isinstance(image, Image.Image) and image.getpixel((0, 0)) == (120, 135, 7)
    assert labels.dtype == torch.long and labels.tolist() == [0, 0, 0]
    assert ds.level_labels("middle").tolist() == [0, 0, 1, 0]


def test_csv_levels_root_and_split(csv_dir, tmp_path_factory) -> None:
    ds = CsvImageDataset(csv_dir / "labels.csv", levels=["middle"])
    assert ds.schema.levels == ("middle",) and ds.labels.shape == (4, 1)
    elsewhere = tmp_path_factory.mktemp("moved")
    (elsewhere / "list.csv").write_text((csv_dir / "labels.csv").read_text())
    moved = CsvImageDataset(elsewhere / "list.csv", root=csv_dir)
    assert moved.load_image(0).size == (12, 12)
    test = CsvImageDataset(csv_dir / "labels.csv", split="test")
    assert len(test) == 2 and [n.rsplit("/", 1)[-1] for n in test.names] == ["2.png", "4.png"]
    with pytest.raises(DatasetError, match="splits present: test, train"):
        CsvImageDataset(csv_dir / "labels.csv", split="val")


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("path,fine\na.png,x\n", {"levels": ["fine", "middle"]}, "missing label column.*'middle'"),
        ("file,fine\na.png,x\n", {}, "missing column 'path'"),
        ("path,colour\na.png,x\n", {}, "no label column"),
        ("", {}, "empty file"),
        ("path,fine\n", {}, "no rows"),
        ("path,fine\na.png,x\nb.png,\n", {}, "line 3: empty 'fine' label for b.png"),
        ("path,fine\na.png,x\n", {"split": "test"}, "no 'split' column"),
        ("path,fine\na.png,x\nb.png,y,z\n", {}, "line 3: more cells than header columns"),
    ],
)
def test_csv_errors_name_the_file_and_field(tmp_path, text: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        CsvImageDataset(path, **kwargs)
    assert "bad.csv" in str(info.value)


def test_missing_csv_and_missing_image(tmp_path) -> None:
    with pytest.raises(DatasetError, match="label file not found"):
        CsvImageDataset(tmp_path / "nope.csv")
    (tmp_path / "labels.csv").write_text("path,fine\nghost.png,x\n")
    ds = CsvImageDataset(tmp_path / "labels.csv")  # opening is lazy: no file is touched yet
    with pytest.raises(CorruptImageError, match=r"ghost\.png: file not found"):
        ds[0]


def test_image_folder_dataset(tmp_path) -> None:
    _png(tmp_path / "dog" / "x1.png", 1)
    _png(tmp_path / "dog" / "deeper" / "x2.jpg", 2)
    _png(tmp_path / "cat" / "y.PNG", 3)
    _png(tmp_path / "loose.png", 4)
    _png(tmp_path / ".hidden" / "z.png", 5)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, level="middle")
    assert ds.schema.levels == ("middle",)
    assert [ds.label_names(i)["middle"] for i in range(len(ds))] == ["cat", "dog", "dog", UNLABELLED]
    assert ds.load_image(1).size == (12, 12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        ImageFolderDataset(tmp_path / "missing")


def test_open_dataset_dispatch(csv_dir, tmp_path_factory) -> None:
    assert isinstance(open_dataset(csv_dir / "labels.csv"), CsvImageDataset)
    assert isinstance(open_dataset(csv_dir), CsvImageDataset)
    assert len(open_dataset(csv_dir, split="train")) == 2
    folder = tmp_path_factory.mktemp("folder")
    _png(folder / "k" / "1.png", 9)
    ds = open_dataset(folder, levels=["coarse"])
    assert isinstance(ds, ImageFolderDataset) and ds.schema.levels == ("coarse",)
    with pytest.raises(DatasetError, match="single label level"):
        open_dataset(folder, levels=["fine", "coarse"])
    with pytest.raises(DatasetError, match="dataset not found"):
        open_dataset(folder / "nothing")
    with pytest.raises(DatasetError, match=r"expected a \.csv"):
        open_dataset(folder / "k" / "1.png")


def _memory_dataset() -> InMemoryImageDataset:
    schema = LabelSchema(("fine", "coarse"))
    vocab = LabelVocabulary(schema, [["a", "b", "c"], ["x", "y"]])
    images = np.stack([np.full((6, 6, 3), v, dtype=np.uint8) for v in (10, 20, 30, 40)])
    labels = np.array([[0, 0], [1, 0], [2, 1], [2, 1]])
    return InMemoryImageDataset(images, labels, schema, vocab, ["i0", "i1", "i2", "i3"])


def test_in_memory_views_share_data() -> None:
    ds = _memory_dataset()
    as_tensor = ds.with_transform(lambda im: torch.from_numpy(np.asarray(im).copy()))
    assert ds.transform is None and isinstance(ds[0][0], Image.Image)
    assert as_tensor[1][0].shape == (6, 6, 3) and int(as_tensor[1][0][0, 0, 0]) == 20
    assert as_tensor.labels is ds.labels and as_tensor.images is ds.images
    sub = as_tensor.subset([3, 0])
    assert len(sub) == 2 and sub.names == ["i3", "i0"]
    assert int(sub[0][0][0, 0, 0]) == 40 and sub[0][1].tolist() == [2, 1]
    assert sub.label_names(1) == {"fine": "a", "coarse": "x"}
    assert sub.vocab is ds.vocab  # ids keep their meaning in a view
    with pytest.raises(IndexError):
        ds.subset([4])


def test_in_memory_validation() -> None:
    ds = _memory_dataset()
    with pytest.raises(DatasetError, match="images for"):
        InMemoryImageDataset(ds.images[:2], ds.labels, ds.schema, ds.vocab, ds.names)
    with pytest.raises(DatasetError, match=r"coarse labels must lie in \[0, 2\)"):
        InMemoryImageDataset(ds.images, ds.labels + np.array([0, 1]), ds.schema, ds.vocab, ds.names)
    with pytest.raises(DatasetError, match="shape"):
        InMemoryImageDataset(ds.images, ds.labels[:, :1].repeat(3, axis=1), ds.schema, ds.vocab, ds.names)
