"""GLDv2-style landmark CSVs: the three layouts, the <a>/<b>/<c>/<id>.jpg image tree, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.datasets import DatasetError
from retrieval.data.images import CorruptImageError
from retrieval.data.landmarks import LandmarksDataset, gldv2_image_path, open_landmarks_csv

IDS = {"000014b1f770f640": "7", "0a1b2c3d4e5f6071": "7", "f00dfeedcafebabe": "42"}  # image id -> landmark


def _gldv2_tree(root: Path) -> Path:
    """Tiny images in the GLDv2 layout, each a different colour so a test can tell them apart."""
    for n, image_id in enumerate(IDS):
        path = root / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12 + n, 8), (40 * n, 0, 0)).save(path)
    return root


def test_gldv2_image_path_follows_the_official_tree(tmp_path):
    assert gldv2_image_path(tmp_path, "000014b1f770f640") == tmp_path / "0/0/0/000014b1f770f640.jpg"
    for bad in ("ab", "a/bcd", ".abc"):
        with pytest.raises(ValueError, match="GLDv2 layout"):
            gldv2_image_path(tmp_path, bad)


def test_id_layout_reads_train_csv_with_extra_columns(tmp_path):
    images = _gldv2_tree(tmp_path / "train")
    rows = [f"{image_id},http://example.org/{image_id}.jpg,{landmark}" for image_id, landmark in IDS.items()]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("id,url,landmark_id\n" + "\n".join(rows) + "\n\n")

    dataset = open_landmarks_csv(csv_path, images)
    assert isinstance(dataset, LandmarksDataset) and dataset.layout == "id"
    assert dataset.schema.levels == ("fine",) and len(dataset) == 3
    assert dataset.vocab.names[0] == ["7", "42"] and dataset.labels[:, 0].tolist() == [0, 0, 1]
    assert dataset.names[2] == str(images / "f/0/0/f00dfeedcafebabe.jpg")
    assert dataset.load_image(1).size == (13, 8)
    assert dataset.label_names(2) == {"fine": "42"}


def test_clean_layout_expands_space_separated_ids(tmp_path):
    images = _gldv2_tree(tmp_path / "train")
    csv_path = tmp_path / "train_clean.csv"
    csv_path.write_text("landmark_id,images\n7,000014b1f770f640 0a1b2c3d4e5f6071\n42,f00dfeedcafebabe\n")

    dataset = open_landmarks_csv(csv_path, images)
    assert dataset.layout == "clean" and len(dataset) == 3
    assert dataset.labels[:, 0].tolist() == [0, 0, 1] and dataset.vocab.names[0] == ["7", "42"]
    assert [Path(n).stem for n in dataset.names] == list(IDS)
    assert np.asarray(dataset.load_image(2)).shape == (8, 14, 3)
    sub = dataset.subset([2, 0])  # views keep names and rows aligned
    assert sub.load_image(0).size == (14, 8) and sub.labels[:, 0].tolist() == [1, 0]


def test_path_layout_resolves_relative_paths_against_the_csv_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (10, 20)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (30, 10)).save(tmp_path / "b.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,landmark_id\nimgs/a.png,1\n{tmp_path / 'b.png'},2\n")

    dataset = open_landmarks_csv(csv_path)
    assert dataset.layout == "path" and dataset.labels[:, 0].tolist() == [0, 1]
    assert dataset.load_image(0).size == (10, 20) and dataset.load_image(1).size == (30, 10)
    rooted = open_landmarks_csv(csv_path, images_root=tmp_path / "imgs")  # images_root replaces the CSV folder
    assert rooted.names[0] == str(tmp_path / "imgs" / "imgs" / "a.png")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty file"),
        ("image,label\na,1\n", r"unrecognised columns \(image, label\)"),
        ("id,landmark_id\n", "no images listed"),
        ("id,landmark_id\nabcd,\n", "line 2: empty 'id' or 'landmark_id'"),
        ("id,landmark_id\nabcd,1,extra\n", "line 2: 3 cells for 2 header columns"),
        ("id,landmark_id\nabcd,1\nab,2\n", "line 3: image id 'ab' does not fit the GLDv2 layout"),
        ("landmark_id,images\n7,\n", "line 2: expected 'landmark_id,<space-separated image ids>'"),
        ("landmark_id,images,url\n7,abcd,x\n", "exactly the columns"),
    ],
)
def test_malformed_files_name_the_file_and_the_line(tmp_path, text, message):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(text)
    with pytest.raises(DatasetError, match=message) as info:
        open_landmarks_csv(csv_path, tmp_path)
    assert "bad.csv" in str(info.value)


def test_missing_files_and_roots_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"landmarks label file not found: .*nope\.csv"):
        open_landmarks_csv(tmp_path / "nope.csv")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("id,landmark_id\n000014b1f770f640,7\n")
    with pytest.raises(DatasetError, match=r"train\.csv: .*need the images folder \(images_root"):
        open_landmarks_csv(csv_path)
    with pytest.raises(DatasetError, match=r"train\.csv: images folder not found: .*missing"):
        open_landmarks_csv(csv_path, tmp_path / "missing")
    dataset = open_landmarks_csv(csv_path, tmp_path)  # images are only looked for when read
    with pytest.raises(CorruptImageError, match=r"000014b1f770f640\.jpg: file not found"):
        dataset.load_image(0)
