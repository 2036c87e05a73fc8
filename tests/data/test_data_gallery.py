"""Gallery inputs (retrieval.data.gallery): folder trees, CSVs with labels and metadata, path lists, errors.

Also covers ``Gallery.fingerprint`` (what lets resumed or sharded extractions be combined), ``load_image`` on
real and corrupt files, and ``as_gallery`` over a labelled CSV dataset.
"""

from __future__ import annotations

import os

import pytest
from PIL import Image

from retrieval.data.datasets import UNLABELLED, CsvImageDataset, DatasetError
from retrieval.data.gallery import Gallery, as_gallery, open_gallery
from retrieval.data.images import CorruptImageError


def _png(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 7)).save(path)


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --- folder trees ------------------------------------------------------------------------------------------


@pytest.fixture()
def folder_tree(tmp_path):
    root = tmp_path / "photos"
    _png(root / "cats" / "a.png", 10)
    _png(root / "cats" / "deep" / "b.png", 20)
    _png(root / "dogs" / "c.png", 30)
    _png(root / "loose.png", 40)
    _png(root / ".cache" / "hidden.png", 50)
    _png(root / "cats" / ".thumbs" / "t.png", 60)
    _write(root / "dogs" / "notes.txt", "not an image\n")
    return root


def test_folder_tree_labels_by_first_subfolder_and_skips_hidden(folder_tree):
    gallery = open_gallery(folder_tree)
    by_name = {os.path.relpath(name, folder_tree): gallery.labels_of(i) for i, name in enumerate(gallery.names)}
    assert by_name == {
        os.path.join("cats", "a.png"): {"fine": "cats"},
        os.path.join("cats", "deep", "b.png"): {"fine": "cats"},
        os.path.join("dogs", "c.png"): {"fine": "dogs"},
        "loose.png": {"fine": UNLABELLED},
    }
    assert UNLABELLED == "unlabelled"
    assert gallery.levels == ("fine",)
    assert len(gallery) == 4
    assert all(os.path.isabs(name) for name in gallery.names)
    assert gallery.source == str(folder_tree)
    assert gallery.extra_of(0) == {}


def test_folder_tree_names_the_single_level(folder_tree):
    gallery = open_gallery(folder_tree, levels=["category"])
    assert gallery.levels == ("category",)
    assert {gallery.labels_of(i)["category"] for i in range(len(gallery))} == {"cats", "dogs", UNLABELLED}


def test_folder_tree_rejects_two_levels(folder_tree):
    with pytest.raises(DatasetError, match="single label level"):
        open_gallery(folder_tree, levels=["fine", "coarse"])


def test_folder_tree_loads_images(folder_tree):
    gallery = open_gallery(folder_tree)
    i = [os.path.basename(n) for n in gallery.names].index("c.png")
    image = gallery.load_image(i)
    assert image.mode == "RGB"
    assert image.size == (8, 8)
    assert image.getpixel((3, 3)) == (30, 225, 7)


def test_folder_holding_labels_csv_opens_the_csv(tmp_path):
    root = tmp_path / "catalogue"
    _png(root / "img" / "x.png", 1)
    _png(root / "stray.png", 2)  # ignored: the CSV decides what is in the gallery
    _write(root / "labels.csv", "path,fine,sku\nimg/x.png,shirt,S-1\n")
    gallery = open_gallery(root)
    assert gallery.source == str(root / "labels.csv")
    assert gallery.names == [os.path.abspath(root / "img" / "x.png")]
    assert gallery.levels == ("fine",)
    assert gallery.labels_of(0) == {"fine": "shirt"}
    assert gallery.extra_of(0) == {"sku": "S-1"}


# --- CSVs --------------------------------------------------------------------------------------------------


def test_csv_with_only_paths_is_unlabelled(tmp_path):
    csv_path = tmp_path / "list.csv"
    _write(csv_path, "path\na.png\nsub/b.png\n")
    gallery = open_gallery(csv_path)
    assert gallery.levels == ()
    assert len(gallery) == 2
    assert gallery.names == [os.path.abspath(tmp_path / "a.png"), os.path.abspath(tmp_path / "sub" / "b.png")]
    for i in range(2):
        assert gallery.labels_of(i) == {}
        assert gallery.extra_of(i) == {}
    assert "unlabelled" in repr(gallery)


@pytest.fixture()
def catalogue_csv(tmp_path):
    folder = tmp_path / "cat"
    absolute = tmp_path / "elsewhere" / "z.png"
    _write(
        folder / "items.csv",
        "path,fine,coarse,sku,url\n"
        "shirts/a.png,tee,top,S-1,https://shop/a\n"
        f"{absolute},,bottom,S-2,https://shop/z\n"
        "\n"
        "café/ü.png,jeans,,,\n",
    )
    return folder / "items.csv"


def test_csv_labels_metadata_and_paths(catalogue_csv):
    gallery = open_gallery(catalogue_csv)
    folder = catalogue_csv.parent
    assert gallery.source == str(catalogue_csv)
    assert gallery.levels == ("fine", "coarse")
    assert len(gallery) == 3  # the blank line is not an item
    assert gallery.names == [
        os.path.abspath(folder / "shirts" / "a.png"),
        os.path.abspath(catalogue_csv.parent.parent / "elsewhere" / "z.png"),
        os.path.abspath(folder / "café" / "ü.png"),
    ]
    assert all(os.path.isabs(name) for name in gallery.names)
    assert gallery.labels_of(0) == {"fine": "tee", "coarse": "top"}
    assert gallery.labels_of(1) == {"coarse": "bottom"}  # empty fine cell: absent, not ""
    assert gallery.labels_of(2) == {"fine": "jeans"}
    assert gallery.extra_of(0) == {"sku": "S-1", "url": "https://shop/a"}
    assert gallery.extra_of(1) == {"sku": "S-2", "url": "https://shop/z"}
    assert gallery.extra_of(2) == {"sku": "", "url": ""}


def test_csv_returns_copies_of_labels_and_metadata(catalogue_csv):
    gallery = open_gallery(catalogue_csv)
    gallery.labels_of(0)["fine"] = "changed"
    gallery.extra_of(0)["sku"] = "changed"
    assert gallery.labels_of(0)["fine"] == "tee"
    assert gallery.extra_of(0)["sku"] == "S-1"


def test_csv_explicit_levels_turn_other_label_columns_into_metadata(catalogue_csv):
    gallery = open_gallery(catalogue_csv, levels=["coarse"])
    assert gallery.levels == ("coarse",)
    assert gallery.labels_of(0) == {"coarse": "top"}
    assert gallery.extra_of(0) == {"fine": "tee", "sku": "S-1", "url": "https://shop/a"}


def test_csv_uppercase_suffix_is_a_csv(tmp_path):
    csv_path = tmp_path / "LIST.CSV"
    _write(csv_path, "path,fine\na.png,x\n")
    gallery = open_gallery(csv_path)
    assert gallery.levels == ("fine",)
    assert gallery.labels_of(0) == {"fine": "x"}


# --- path lists --------------------------------------------------------------------------------------------


def test_path_list_skips_blank_lines_and_comments(tmp_path):
    absolute = tmp_path / "other" / "abs.png"
    list_path = tmp_path / "lists" / "gallery.txt"
    _write(list_path, f"# crawl of 2024\n\nimgs/one.png\n   \n  # indented comment\n  two.jpg  \n{absolute}\n")
    gallery = open_gallery(list_path)
    assert gallery.names == [
        os.path.abspath(tmp_path / "lists" / "imgs" / "one.png"),
        os.path.abspath(tmp_path / "lists" / "two.jpg"),
        str(absolute),
    ]
    assert gallery.levels == ()
    assert gallery.source == str(list_path)
    assert [gallery.labels_of(i) for i in range(3)] == [{}, {}, {}]
    assert [gallery.extra_of(i) for i in range(3)] == [{}, {}, {}]


def test_path_list_with_utf8_bom_and_unicode_names(tmp_path):
    list_path = tmp_path / "paths.lst"
    list_path.write_bytes("\ufeffimágenes/ñ.png\n".encode())
    gallery = open_gallery(list_path)
    assert gallery.names == [os.path.abspath(tmp_path / "imágenes" / "ñ.png")]


def test_path_list_loads_real_pngs(tmp_path):
    _png(tmp_path / "a.png", 100)
    _png(tmp_path / "b.png", 200)
    _write(tmp_path / "list.txt", "a.png\nb.png\n")
    gallery = open_gallery(tmp_path / "list.txt")
    images = [gallery.load_image(i) for i in range(2)]
    assert [im.size for im in images] == [(8, 8), (8, 8)]
    assert [im.mode for im in images] == ["RGB", "RGB"]
    assert images[0].getpixel((0, 0)) == (100, 155, 7)
    assert images[1].getpixel((7, 7)) == (200, 55, 7)


def test_load_image_of_corrupt_file_names_it(tmp_path):
    _png(tmp_path / "good.png", 5)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    _write(tmp_path / "list.txt", "good.png\nbad.png\nmissing.png\n")
    gallery = open_gallery(tmp_path / "list.txt")
    assert gallery.load_image(0).size == (8, 8)
    with pytest.raises(CorruptImageError, match=r"bad\.png") as info:
        gallery.load_image(1)
    assert info.value.source == os.path.abspath(tmp_path / "bad.png")
    with pytest.raises(CorruptImageError, match="file not found"):
        gallery.load_image(2)


def test_load_image_of_corrupt_file_in_a_folder_tree(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "broken.png").write_bytes(b"garbage bytes")
    gallery = open_gallery(tmp_path)
    with pytest.raises(CorruptImageError, match=r"broken\.png"):
        gallery.load_image(0)


# --- errors ------------------------------------------------------------------------------------------------


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="gallery not found"):
        open_gallery(tmp_path / "nope")


def test_image_given_instead_of_a_list_is_an_error(tmp_path):
    _png(tmp_path / "photo.PNG", 1)
    with pytest.raises(DatasetError, match="is an image; give the folder"):
        open_gallery(tmp_path / "photo.PNG")


def test_empty_path_list_is_an_error(tmp_path):
    _write(tmp_path / "empty.txt", "# nothing yet\n\n   \n")
    with pytest.raises(DatasetError, match="no paths listed"):
        open_gallery(tmp_path / "empty.txt")


def test_non_utf8_path_list_is_an_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9.png\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not a UTF-8 text file"):
        open_gallery(tmp_path / "latin1.txt")


def test_csv_without_path_column_is_an_error(tmp_path):
    _write(tmp_path / "bad.csv", "file,fine\na.png,x\n")
    with pytest.raises(DatasetError, match="missing column 'path'"):
        open_gallery(tmp_path / "bad.csv")


def test_csv_with_empty_path_cell_is_an_error(tmp_path):
    _write(tmp_path / "bad.csv", "path,fine\na.png,x\n ,y\n")
    with pytest.raises(DatasetError, match="line 3: empty 'path'"):
        open_gallery(tmp_path / "bad.csv")


def test_levels_naming_a_missing_column_is_an_error(catalogue_csv):
    with pytest.raises(DatasetError, match="missing label column\\(s\\) 'middle'"):
        open_gallery(catalogue_csv, levels=["fine", "middle"])


def test_levels_with_a_path_list_is_an_error(tmp_path):
    _write(tmp_path / "list.txt", "a.png\n")
    with pytest.raises(DatasetError, match="carries no labels"):
        open_gallery(tmp_path / "list.txt", levels=["fine"])


def test_mismatched_rows_are_rejected_by_the_constructor():
    with pytest.raises(DatasetError, match="1 labels rows for 2 items"):
        Gallery("g", ["a", "b"], ["fine"], labels=[{"fine": "x"}])
    with pytest.raises(DatasetError, match="3 metadata rows for 2 items"):
        Gallery("g", ["a", "b"], extras=[{}, {}, {}])


# --- fingerprint -------------------------------------------------------------------------------------------

_BASE_CSV = "path,fine,sku\na.png,shirt,S-1\nb.png,jeans,S-2\nc.png,hat,S-3\n"


def _fingerprint(tmp_path, name: str, text: str) -> str:
    _write(tmp_path / name / "g.csv", text)
    return open_gallery(tmp_path / name / "g.csv").fingerprint()


def test_fingerprint_is_stable_across_opens(tmp_path):
    _write(tmp_path / "g.csv", _BASE_CSV)
    first = open_gallery(tmp_path / "g.csv").fingerprint()
    second = open_gallery(tmp_path / "g.csv").fingerprint()
    assert first == second
    assert len(first) == 64 and int(first, 16) >= 0


def test_fingerprint_changes_with_a_label_a_metadata_cell_or_the_order(tmp_path):
    base = _fingerprint(tmp_path, "base", _BASE_CSV)
    relabelled = _fingerprint(tmp_path, "base", _BASE_CSV.replace("b.png,jeans", "b.png,shorts"))
    new_sku = _fingerprint(tmp_path, "base", _BASE_CSV.replace("S-3", "S-4"))
    reordered = _fingerprint(tmp_path, "base", "path,fine,sku\nb.png,jeans,S-2\na.png,shirt,S-1\nc.png,hat,S-3\n")
    assert base == _fingerprint(tmp_path, "base", _BASE_CSV)
    assert len({base, relabelled, new_sku, reordered}) == 4


def test_fingerprint_depends_on_the_resolved_paths(tmp_path):
    # The same CSV in two folders lists different files.
    assert _fingerprint(tmp_path, "one", _BASE_CSV) != _fingerprint(tmp_path, "two", _BASE_CSV)


# --- as_gallery --------------------------------------------------------------------------------------------


@pytest.fixture()
def labelled_csv(tmp_path):
    _png(tmp_path / "a.png", 11)
    _png(tmp_path / "b.png", 22)
    _png(tmp_path / "c.png", 33)
    csv_path = tmp_path / "labels.csv"
    _write(csv_path, "path,fine,coarse\na.png,tee,top\nb.png,jeans,bottom\nc.png,polo,top\n")
    return csv_path


def test_as_gallery_keeps_dataset_names_and_labels(labelled_csv):
    dataset = CsvImageDataset(labelled_csv)
    gallery = as_gallery(dataset)
    assert isinstance(gallery, Gallery)
    assert gallery.source == str(labelled_csv)
    assert gallery.names == dataset.names
    assert gallery.levels == ("fine", "coarse")
    assert len(gallery) == len(dataset) == 3
    for i in range(len(dataset)):
        assert gallery.labels_of(i) == dataset.label_names(i)
        assert gallery.extra_of(i) == {}
    assert gallery.labels_of(1) == {"fine": "jeans", "coarse": "bottom"}
    assert gallery.load_image(2).getpixel((0, 0)) == (33, 222, 7)
    assert gallery.transform is None


def test_as_gallery_of_a_gallery_is_itself(labelled_csv):
    gallery = open_gallery(labelled_csv)
    assert as_gallery(gallery) is gallery


def test_dataset_and_csv_gallery_of_the_same_file_share_a_fingerprint(labelled_csv):
    # Indexing a labelled dataset and the same CSV opened as a gallery describe the same items.
    assert as_gallery(CsvImageDataset(labelled_csv)).fingerprint() == open_gallery(labelled_csv).fingerprint()


def test_as_gallery_of_a_subset_follows_the_view(labelled_csv):
    dataset = CsvImageDataset(labelled_csv).subset([2, 0])
    gallery = as_gallery(dataset)
    assert [os.path.basename(n) for n in gallery.names] == ["c.png", "a.png"]
    assert gallery.labels_of(0) == {"fine": "polo", "coarse": "top"}
    assert gallery.load_image(1).getpixel((0, 0)) == (11, 244, 7)
