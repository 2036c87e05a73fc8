"""SfM-120k training layout: the official pickle + ims/ tree, labels, official pairs, and refused pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.datasets import DatasetError
from retrieval.data.images import CorruptImageError
from retrieval.data.sfm120k import SFM120K, Sfm120kDataset, cid_to_path, open_sfm120k

# cids as in the release: hex strings; the last six characters pick the folders.
TRAIN_CIDS = ["a1b2c3d4e5f601", "a1b2c3d4e5f602", "0f0e0d0c0b0a99", "deadbeefcafe00", "0123456789abcd"]
TRAIN_CLUSTERS = [17, 17, 4, 4, 17]
VAL_CIDS = ["feedfacefeed01", "feedfacefeed02"]


def _layout(root: Path, layout: object | None = None) -> Path:
    """``ROOT/retrieval-SfM-120k.pkl`` (plain lists, pickle.dump) and tiny PNGs under ``ims/``."""
    root.mkdir(parents=True, exist_ok=True)
    if layout is None:
        layout = {
            "train": {"cids": TRAIN_CIDS, "cluster": TRAIN_CLUSTERS, "qidxs": [0, 2, 4], "pidxs": [1, 3, 0]},
            "val": {"cids": VAL_CIDS, "cluster": [9, 9], "qidxs": [0], "pidxs": [1]},
        }
    with open(root / f"{SFM120K}.pkl", "wb") as fh:
        pickle.dump(layout, fh)
    for n, cid in enumerate([*TRAIN_CIDS, *VAL_CIDS]):
        path = cid_to_path(root / "ims", cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # no extension, as in the release: decoded by content
            Image.new("RGB", (10 + n, 6), (30 * n, 0, 0)).save(fh, format="PNG")
    return root


def test_cid_to_path_follows_cirtorch(tmp_path):
    assert cid_to_path(tmp_path, "a1b2c3d4e5f601") == tmp_path / "01" / "f6" / "e5" / "a1b2c3d4e5f601"
    for bad in ("abcde", "ab/cdef", ".abcdef"):
        with pytest.raises(ValueError, match="SfM-120k layout"):
            cid_to_path(tmp_path, bad)


def test_train_split_labels_paths_and_official_pairs(tmp_path):
    root = _layout(tmp_path / SFM120K)
    dataset = open_sfm120k(root)
    assert isinstance(dataset, Sfm120kDataset) and dataset.split == "train" and len(dataset) == 5
    assert dataset.schema.levels == ("fine",)
    assert dataset.labels[:, 0].tolist() == [0, 0, 1, 1, 0]  # first-seen order of the clusters
    assert dataset.vocab.names[0] == ["17", "4"] and dataset.label_names(2) == {"fine": "4"}
    assert dataset.clusters.tolist() == TRAIN_CLUSTERS and dataset.cids == TRAIN_CIDS
    assert dataset.query_indices.tolist() == [0, 2, 4] and dataset.positive_indices.tolist() == [1, 3, 0]
    assert dataset.query_indices.dtype == np.int64 and dataset.positive_indices.dtype == np.int64
    assert dataset.names[0] == os.path.abspath(root / "ims" / "01" / "f6" / "e5" / TRAIN_CIDS[0])
    assert dataset.load_image(3).size == (13, 6)
    # the official positives share their query's cluster
    assert (dataset.clusters[dataset.query_indices] == dataset.clusters[dataset.positive_indices]).all()


def test_subset_views_renumber_the_official_pairs(tmp_path):
    dataset = open_sfm120k(_layout(tmp_path / SFM120K))  # pairs (0, 1), (2, 3), (4, 0)
    view = dataset.subset([4, 3, 2, 0])
    assert isinstance(view, Sfm120kDataset) and view.cids == [TRAIN_CIDS[i] for i in (4, 3, 2, 0)]
    assert view.clusters.tolist() == [17, 4, 4, 17] and view.labels[:, 0].tolist() == [0, 1, 1, 0]
    # (0, 1) loses image 1; (2, 3) -> (2, 1); (4, 0) -> (0, 3)
    assert view.query_indices.tolist() == [2, 0] and view.positive_indices.tolist() == [1, 3]
    assert view.names[view.query_indices[1]] == dataset.names[4]
    assert dataset.query_indices.tolist() == [0, 2, 4]  # the original is untouched
    again = view.with_transform(None).subset([0, 3])
    assert again.query_indices.tolist() == [0] and again.positive_indices.tolist() == [1]
    assert len(dataset.subset([]).query_indices) == 0


def test_val_split_and_parent_folder(tmp_path):
    _layout(tmp_path / SFM120K)
    dataset = open_sfm120k(tmp_path, split="val")  # the folder above the release works too
    assert dataset.split == "val" and len(dataset) == 2 and dataset.clusters.tolist() == [9, 9]
    assert dataset.query_indices.tolist() == [0] and dataset.positive_indices.tolist() == [1]
    assert dataset.load_image(1).size == (16, 6)


def test_numpy_arrays_in_the_pickle_load(tmp_path):
    layout = {"train": {"cids": np.array(TRAIN_CIDS), "cluster": np.array(TRAIN_CLUSTERS),
                        "qidxs": np.array([1]), "pidxs": np.array([0])}}  # fmt: skip
    dataset = open_sfm120k(_layout(tmp_path / "r", layout))
    assert dataset.cids == TRAIN_CIDS and dataset.query_indices.tolist() == [1]


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"layout not found; tried .*retrieval-SfM-120k\.pkl"):
        open_sfm120k(tmp_path)
    root = _layout(tmp_path / "r")
    missing = cid_to_path(root / "ims", TRAIN_CIDS[1])
    missing.unlink()
    with pytest.raises(CorruptImageError, match=TRAIN_CIDS[1]):
        open_sfm120k(root).load_image(1)
    (root / "ims").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match="image folder not found"):
        open_sfm120k(root)
    assert len(open_sfm120k(root, require_images=False)) == 5
    with pytest.raises(DatasetError, match="valid splits: train, val"):
        open_sfm120k(root, split="test")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([1, 2], "expected a dict of splits"),
        ({"train": {}}, r"no 'val' split \(splits: train\)"),
        ({"val": [1]}, "split 'val': expected a dict"),
        ({"val": {"cids": VAL_CIDS, "cluster": [1, 1], "qidxs": []}}, r"missing key\(s\) pidxs"),
        ({"val": {"cids": VAL_CIDS, "cluster": [1], "qidxs": [], "pidxs": []}}, "'cluster' has 1 entries for 2"),
        ({"val": {"cids": VAL_CIDS, "cluster": [1, 1], "qidxs": [0], "pidxs": []}}, "they pair up"),
        ({"val": {"cids": VAL_CIDS, "cluster": [1, 1], "qidxs": [2], "pidxs": [0]}}, r"outside \[0, 2\)"),
        ({"val": {"cids": VAL_CIDS, "cluster": ["a", "b"], "qidxs": [], "pidxs": []}}, "'cluster' must be"),
        ({"val": {"cids": ["abc"], "cluster": [1], "qidxs": [], "pidxs": []}}, "does not fit"),
        ({"val": {"cids": [], "cluster": [], "qidxs": [], "pidxs": []}}, "'cids' is empty"),
    ],
)
def test_malformed_layouts_name_the_problem(tmp_path, layout, message):
    root = _layout(tmp_path / "r", layout)
    with pytest.raises(DatasetError, match=message) as err:
        open_sfm120k(root, split="val")
    assert "\n" not in str(err.value) and str(root / f"{SFM120K}.pkl") in str(err.value)


class _Exploit:
    """Unpickling this would run ``os.system``."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("payload", [_Exploit(), {"train": {"cids": [_Exploit()]}}])
def test_refuses_a_pickle_that_would_run_code(tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    root = _layout(tmp_path / "r")
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        (root / f"{SFM120K}.pkl").write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(DatasetError, match=r"refusing to load global (posix|nt)\.system"):
            open_sfm120k(root)
    assert not (tmp_path / "pwned").exists()


def test_truncated_pickle_is_a_dataset_error(tmp_path):
    root = _layout(tmp_path / "r")
    path = root / f"{SFM120K}.pkl"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DatasetError, match=r"retrieval-SfM-120k\.pkl: .*retrieval-SfM-120k pickle \(.*truncated"):
        open_sfm120k(root)
