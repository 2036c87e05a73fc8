"""Revisited Oxford/Paris loader: official layout, bbx cropping, malformed and malicious ground-truth pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.images import CorruptImageError
from retrieval.data.revisited import crop_box, open_revisited

DB = ["db_a", "db_b", "db_c"]
QUERIES = ["q_0", "q_1"]


def _gnd(**overrides) -> dict:
    gnd = {
        "imlist": list(DB),
        "qimlist": list(QUERIES),
        "gnd": [
            {"bbx": [1.5, 2.2, 9.7, 8.0], "easy": [0], "hard": [2], "junk": []},
            {"bbx": np.array([0.0, 0.0, 40.0, 40.0]), "easy": np.array([1, 2]), "hard": np.array([]), "junk": [0]},
        ],
    }
    gnd.update(overrides)
    return gnd


def _write(root: Path, gnd: dict, name: str = "roxford5k", images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    if images:
        for i, image in enumerate([*DB, *QUERIES]):
            (root / "jpg").mkdir(exist_ok=True)
            Image.new("RGB", (16, 12), (20 * i, 100, 200)).save(root / "jpg" / f"{image}.jpg")
    return root


def test_opens_official_layout_and_crops_queries_outward(tmp_path):
    root = _write(tmp_path / "roxford5k", _gnd())
    dataset = open_revisited("roxford5k", root)
    assert isinstance(dataset.queries, LabelledImageDataset) and isinstance(dataset.database, LabelledImageDataset)
    assert dataset.database.names == [os.path.abspath(root / "jpg" / f"{n}.jpg") for n in DB]
    assert len(dataset.queries) == 2 and dataset.queries.labels.tolist() == [[0], [0]]
    assert dataset.database.load_image(0).size == (16, 12)
    # [1.5, 2.2, 9.7, 8.0] -> floor/ceil outward: left 1, top 2, right 10, bottom 8 -> 9 x 6
    assert dataset.queries.load_image(0).size == (9, 6)
    # a box larger than the image is clipped to it
    assert dataset.queries.load_image(1).size == (16, 12)
    first = dataset.ground_truth[0]
    assert first.easy.tolist() == [0] and first.hard.tolist() == [2] and first.junk.dtype == np.int64
    assert dataset.ground_truth[1].hard.shape == (0,)
    assert dataset.gnd_path == root / "gnd_roxford5k.pkl"


def test_accepts_the_parent_folder_and_names_tried_paths(tmp_path):
    _write(tmp_path / "rparis6k", _gnd(), name="rparis6k")
    assert len(open_revisited("rparis6k", tmp_path).database) == 3
    with pytest.raises(DatasetError) as info:
        open_revisited("roxford5k", tmp_path)
    assert str(tmp_path / "gnd_roxford5k.pkl") in str(info.value)
    assert str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl") in str(info.value)


def test_unknown_name_and_missing_images(tmp_path):
    with pytest.raises(DatasetError, match="roxford5k, rparis6k"):
        open_revisited("oxford105k", tmp_path)
    root = _write(tmp_path / "ox", _gnd(), images=False)
    with pytest.raises(DatasetError, match="image folder not found"):
        open_revisited("roxford5k", root)
    assert len(open_revisited("roxford5k", root, require_images=False).queries) == 2


def test_missing_image_file_fails_when_read_naming_it(tmp_path):
    root = _write(tmp_path / "ox", _gnd())
    (root / "jpg" / "db_b.jpg").unlink()
    dataset = open_revisited("roxford5k", root)
    with pytest.raises(CorruptImageError, match=r"db_b\.jpg"):
        dataset.database.load_image(1)


@pytest.mark.parametrize(
    ("gnd", "message"),
    [
        ([1, 2], "expected a dict"),
        (_gnd(qimlist="q"), "qimlist"),
        ({"imlist": DB, "gnd": []}, "missing key"),
        (_gnd(gnd=[{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [], "junk": []}]), "one entry per query"),
        (_gnd(gnd=[{"bbx": [0, 0, 1, 1], "easy": [0], "hard": []}] * 2), "missing key"),
        (_gnd(gnd=[{"bbx": [0, 0, 1], "easy": [0], "hard": [], "junk": []}] * 2), "bbx"),
        (_gnd(gnd=[{"bbx": [5, 0, 1, 1], "easy": [0], "hard": [], "junk": []}] * 2), "empty"),
        (_gnd(gnd=[{"bbx": [0, 0, 1, 1], "easy": [3], "hard": [], "junk": []}] * 2), r"outside \[0, 3\)"),
        (_gnd(gnd=[{"bbx": [0, 0, 1, 1], "easy": [0.5], "hard": [], "junk": []}] * 2), "integer"),
        (_gnd(gnd=[{"bbx": [0, 0, 1, 1], "easy": [-1], "hard": [], "junk": []}] * 2), "outside"),
    ],
)
def test_malformed_ground_truth(tmp_path, gnd, message):
    root = _write(tmp_path / "ox", gnd, images=False)
    with pytest.raises(DatasetError, match=message):
        open_revisited("roxford5k", root, require_images=False)


def test_truncated_pickle(tmp_path):
    root = tmp_path / "ox"
    root.mkdir()
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(_gnd())[:40])
    with pytest.raises(DatasetError, match=r"gnd_roxford5k\.pkl"):
        open_revisited("roxford5k", root, require_images=False)


class _Exploit:
    """Unpickling this would run ``os.system``."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload", [_Exploit(), {"imlist": [_Exploit()]}, np.array([1, "x"], dtype=object)])
def test_refuses_pickles_that_name_other_globals(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "ox"
    root.mkdir()
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(DatasetError, match=r"refusing|object arrays"):
            open_revisited("roxford5k", root, require_images=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_arrays_load_with_every_protocol(tmp_path, protocol):
    gnd = _gnd()
    gnd["gnd"][0] = {"bbx": np.array([1.0, 1.0, 5.0, 5.0]), "easy": np.array([0, 1]), "hard": [], "junk": [np.int64(2)]}
    gnd["gnd"][1] = {"bbx": [0, 0, 4, 4], "easy": np.array([2.0]), "hard": [], "junk": []}  # whole floats are fine
    root = tmp_path / "ox"
    root.mkdir()
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=protocol))
    dataset = open_revisited("roxford5k", root, require_images=False)
    assert dataset.ground_truth[0].easy.tolist() == [0, 1] and dataset.ground_truth[0].junk.tolist() == [2]
    assert dataset.ground_truth[1].easy.tolist() == [2] and dataset.ground_truth[1].easy.dtype == np.int64


def test_crop_box_rounding():
    assert crop_box(np.array([0.2, 0.9, 3.1, 4.0]), (10, 10)) == (0, 0, 4, 4)
    assert crop_box(np.array([-3.0, 2.0, 30.0, 3.5]), (10, 10)) == (0, 2, 10, 4)
    assert crop_box(np.array([12.0, 0.0, 15.0, 3.0]), (10, 10)) is None
