"""DyML loaders on a miniature copy of the official layout, glued-header quirk included."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from retrieval.data.datasets import DatasetError
from retrieval.data.dyml import DYML_LEVELS, DymlLevelSplit, open_dyml_test, open_dyml_train, read_dyml_csv
from retrieval.data.images import CorruptImageError
from retrieval.data.labels import LabelSchema
from training.config import DataConfig
from training.data_factory import build_datasets

# fname, coarse, middle, fine: 2 coarse > 3 middle > 5 fine classes, nested
TRAIN = [
    ("0.jpg", "1", "10", "100"),
    ("1.jpg", "1", "10", "101"),
    ("2.png", "1", "11", "102"),
    ("3.jpg", "2", "20", "200"),
    ("4.jpg", "2", "20", "201"),
    ("5.jpg", "1", "10", "100"),
]
GLUED_HEADER = "fname, coarse_id, middle_id, fine_id"


def _image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (value, 255 - value, 9)).save(path)


def _glued(header: str, rows, sep: str = ", ") -> str:
    """The released files' format: no line break after the header, ', ' separators, a trailing newline."""
    return header + "\n".join(sep.join(row) for row in rows) + "\n"


def _well_formed(header: str, rows, sep: str = ", ") -> str:
    return header + "\n" + "\n".join(sep.join(row) for row in rows) + "\n\n"


def _write_train(root, text: str) -> None:
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "train" / "label.csv").write_text(text)
    for i, (fname, *_ids) in enumerate(TRAIN):
        _image(root / "train" / "imgs" / fname, 40 * i)


@pytest.fixture()
def vehicle_root(tmp_path):
    root = tmp_path / "vehicle"
    _write_train(root, _glued(GLUED_HEADER, TRAIN))
    for n, level in enumerate(DYML_LEVELS):
        for part, count in (("query", 2), ("gallery", 3 + n)):
            rows = [(f"{part}{i}.jpg", f"{level[0]}{i % 2}") for i in range(count)]
            (root / f"bmk_{level}").mkdir(parents=True, exist_ok=True)
            (root / f"bmk_{level}" / f"{part}.csv").write_text(_glued("fname, labels", rows))
            for i, (fname, _label) in enumerate(rows):
                _image(root / f"bmk_{level}" / part / fname, 30 * i)
    return root


@pytest.fixture()
def product_root(tmp_path):
    root = tmp_path / "product"
    (root / "mini-bmk_all_in_one").mkdir(parents=True)
    (root / "mini-bmk_all_in_one" / "label.csv").write_text(_glued(GLUED_HEADER, TRAIN[:4]))
    for i, (fname, *_ids) in enumerate(TRAIN[:4]):
        _image(root / "mini-bmk_all_in_one" / "imgs" / fname, 50 * i)
    return root


def test_glued_and_well_formed_headers_give_the_same_rows_and_keep_the_first(tmp_path) -> None:
    texts = {
        "glued": _glued(GLUED_HEADER, TRAIN),
        "glued_no_id": _glued("fname,coarse,middle,fine", TRAIN, sep=","),
        "well_formed": _well_formed(GLUED_HEADER, TRAIN),
        "no_spaces": _well_formed("fname,coarse,middle,fine", TRAIN, sep=","),
    }
    results = {}
    for name, text in texts.items():
        (tmp_path / f"{name}.csv").write_text(text)
        results[name] = read_dyml_csv(tmp_path / f"{name}.csv", ["fname", "coarse", "middle", "fine"])
    expected = [{"fname": f, "coarse": c, "middle": m, "fine": x} for f, c, m, x in TRAIN]
    assert all(rows == expected for rows in results.values()), results


def test_columns_are_found_by_name_in_any_order(tmp_path) -> None:
    reordered = [(fine, fname, middle, coarse) for fname, coarse, middle, fine in TRAIN]
    for i, text in enumerate(
        [
            _glued("fine_id, fname, middle_id, coarse_id", reordered),
            _well_formed("Fine, FNAME, middle, coarse", reordered),
        ]
    ):
        (tmp_path / f"{i}.csv").write_text(text)
        rows = read_dyml_csv(tmp_path / f"{i}.csv", ["fname", "fine", "coarse"])
        assert rows[0] == {"fname": "0.jpg", "fine": "100", "coarse": "1"} and len(rows) == len(TRAIN)


def test_train_set_labels_paths_and_lazy_images(tmp_path) -> None:
    glued, plain = tmp_path / "glued", tmp_path / "plain"
    _write_train(glued, _glued(GLUED_HEADER, TRAIN))
    _write_train(plain, _well_formed("fname,fine,middle,coarse", [(f, x, m, c) for f, c, m, x in TRAIN], sep=","))
    ds = open_dyml_train(glued)
    same = open_dyml_train(plain)
    assert ds.schema.levels == DYML_LEVELS and len(ds) == len(TRAIN) == len(same)
    np.testing.assert_array_equal(ds.labels, same.labels)
    assert ds.label_names(0) == {"fine": "100", "middle": "10", "coarse": "1"}  # first row kept
    assert ds.label_names(5) == ds.label_names(0) and ds.labels[:, 0].tolist() == [0, 1, 2, 3, 4, 0]
    assert ds.names[2] == os.path.abspath(glued / "train" / "imgs" / "2.png")
    assert ds.load_image(1).size == (8, 6)
    image, labels = ds.subset([3]).with_transform(lambda im: im.size)[0]
    assert image == (8, 6) and labels.tolist() == ds.labels[3].tolist()


def test_vehicle_layout_gives_a_query_and_gallery_per_level(vehicle_root) -> None:
    splits = open_dyml_test(vehicle_root)
    assert [s.level for s in splits] == list(DYML_LEVELS)
    for n, split in enumerate(splits):
        assert isinstance(split, DymlLevelSplit) and split.gallery is not None
        assert split.query.schema == split.gallery.schema == LabelSchema((split.level,))
        assert (len(split.query), len(split.gallery)) == (2, 3 + n)
        letter = split.level[0]
        assert split.query.vocab.names[0] == [f"{letter}0", f"{letter}1"]
        assert [split.gallery.label_names(i)[split.level] for i in range(3)] == [f"{letter}{i % 2}" for i in range(3)]
        assert split.query.names[0] == os.path.abspath(vehicle_root / f"bmk_{split.level}" / "query" / "query0.jpg")
        assert split.query.load_image(1).size == split.gallery.load_image(2).size == (8, 6)


def test_product_layout_is_leave_one_out_at_three_levels(product_root) -> None:
    splits = open_dyml_test(product_root)
    assert [s.level for s in splits] == list(DYML_LEVELS)
    assert all(s.gallery is None and len(s.query) == 4 for s in splits)
    fine, middle, coarse = (s.query for s in splits)
    assert [fine.label_names(i)["fine"] for i in range(4)] == ["100", "101", "102", "200"]
    assert middle.level_labels("middle").tolist() == [0, 0, 1, 2]
    assert coarse.vocab.names[0] == ["1", "2"] and coarse.schema.levels == ("coarse",)
    assert fine.names == coarse.names and fine.load_image(3).size == (8, 6)


def test_build_datasets_trains_on_the_dyml_train_split(vehicle_root) -> None:
    train, val = build_datasets(DataConfig(source="dyml", dyml_root=vehicle_root))
    assert val is None and len(train) == len(TRAIN) and train.schema.levels == DYML_LEVELS
    with pytest.raises(ValueError, match="dyml_root is required"):
        DataConfig(source="dyml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fname, coarse_id, middle_id\n0.jpg, 1, 10\n", r"label\.csv: missing column\(s\) 'fine'"),
        (_glued(GLUED_HEADER, [("0.jpg", "1", "10")]), r"label\.csv, line 1: .*glued.*3 fields instead of 4"),
        (_well_formed(GLUED_HEADER, [TRAIN[0], ("1.jpg", "1", "10")]), r"label\.csv, line 3: 3 fields, expected 4"),
        (_glued(GLUED_HEADER, [TRAIN[0], (*TRAIN[1], "x")]), r"label\.csv, line 2: 5 fields, expected 4"),
        (_well_formed(GLUED_HEADER, [("0.jpg", "1", "", "100")]), r"label\.csv, line 2: empty 'middle'"),
        ("", r"label\.csv: empty file"),
        (_glued(GLUED_HEADER, [("0.jpg", "1", "10", "100"), ("1.jpg", "1", "11", "100")]), r"do not nest: fine id 100"),
    ],
)
def test_malformed_train_csv_names_the_file(tmp_path, text, message) -> None:
    _write_train(tmp_path, text)
    with pytest.raises(DatasetError, match=message):
        open_dyml_train(tmp_path)


def test_missing_files_and_layouts_say_what_is_expected(tmp_path, vehicle_root, product_root) -> None:
    with pytest.raises(DatasetError, match=r"DyML dataset root not found: .*nowhere"):
        open_dyml_train(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="DyML dataset root not found"):
        open_dyml_test(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"label file not found: .*product/train/label\.csv.*train/imgs"):
        open_dyml_train(product_root)
    with pytest.raises(DatasetError, match=r"no DyML test set found; expected bmk_fine/.*mini-bmk_all_in_one/"):
        open_dyml_test(tmp_path)
    (vehicle_root / "bmk_middle" / "gallery.csv").unlink()
    with pytest.raises(DatasetError, match=r"label file not found: .*bmk_middle/gallery\.csv"):
        open_dyml_test(vehicle_root)
    (vehicle_root / "bmk_middle" / "gallery.csv").write_text("fname, label_id\ng.jpg, 1\n")  # 'label' works too
    assert len(open_dyml_test(vehicle_root)[1].gallery) == 1
    shutil.rmtree(vehicle_root / "bmk_coarse")
    with pytest.raises(DatasetError, match=r"missing bmk_coarse/ \(expected bmk_fine/"):
        open_dyml_test(vehicle_root)
    (product_root / "mini-bmk_all_in_one" / "label.csv").write_text("fname, labels\n0.jpg, 1\n")
    with pytest.raises(DatasetError, match=r"mini-bmk_all_in_one/label\.csv: missing column\(s\) 'fine', 'middle'"):
        open_dyml_test(product_root)


def test_missing_images_fail_only_when_read(vehicle_root) -> None:
    (vehicle_root / "train" / "imgs" / "0.jpg").unlink()
    ds = open_dyml_train(vehicle_root)  # opening does not touch the images
    with pytest.raises(CorruptImageError, match=r"0\.jpg: file not found"):
        ds.load_image(0)


def test_extra_columns_are_ignored_even_when_named_like_a_level(tmp_path) -> None:
    text = _well_formed(
        "fname, fine_grained_note, fine, note", [("0.jpg", "a", "100", "b"), ("1.jpg", "c", "101", "d")]
    )
    (tmp_path / "extra.csv").write_text(text)
    assert read_dyml_csv(tmp_path / "extra.csv", ["fine", "fname"]) == [
        {"fine": "100", "fname": "0.jpg"},
        {"fine": "101", "fname": "1.jpg"},
    ]
    (tmp_path / "last.csv").write_text(_well_formed("fname, labels, fine_grained", [("0.jpg", "7", "x")]))
    assert read_dyml_csv(tmp_path / "last.csv", ["fname", "labels"]) == [{"fname": "0.jpg", "labels": "7"}]
