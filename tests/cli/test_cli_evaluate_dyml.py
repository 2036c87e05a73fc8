"""``retrieval evaluate dyml``: saved embeddings, a miniature DyML-Vehicle/Product layout, and bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app
from retrieval.evaluation.dyml import DymlLevelEmbeddings, evaluate_dyml, load_dyml_embeddings, save_dyml_embeddings

runner = CliRunner()

# Per level: (query ids, gallery ids). Query and gallery list the classes in different orders, so
# ids that only meant something inside one file would pair the wrong classes.
VEHICLE = {
    "fine": (["7", "3", "7", "3"], ["3", "3", "7", "7", "9", "9"]),
    "middle": (["1", "2", "2"], ["2", "1", "1", "2"]),
    "coarse": (["0", "5"], ["5", "0", "5"]),
}
BROKEN = "bmk_fine/gallery/g5.jpg"  # the second class-9 gallery image of the fine level


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


@pytest.fixture(scope="module")
def vehicle_root(tmp_path_factory) -> Path:
    """bmk_<level>/{query,gallery}.csv with ", "-separated fname/labels, images beside them, one broken."""
    root = tmp_path_factory.mktemp("dyml-vehicle")
    seed = 0
    for level, parts in VEHICLE.items():
        for part, ids in zip(("query", "gallery"), parts, strict=True):
            rows = []
            for i, class_id in enumerate(ids):
                name = f"{part[0]}{i}.jpg"
                _image(root / f"bmk_{level}" / part / name, seed := seed + 1)
                rows.append(f"{name}, {class_id}")
            # The released files glue the first row onto the header; keep that quirk for one file.
            glued = level == "middle" and part == "query"
            header = "fname, labels" if glued else "fname, labels\n"
            (root / f"bmk_{level}" / f"{part}.csv").write_text(header + "\n".join(rows) + "\n")
    (root / BROKEN).write_bytes(b"not a jpeg")
    return root


def _run(args: list[str]) -> dict:
    result = runner.invoke(app, ["evaluate", "dyml", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _count_embedded(monkeypatch) -> list[int]:
    import indexing.extract

    sizes: list[int] = []
    original = indexing.extract.extract_embeddings

    def counting(encoder, dataset, *args, **kwargs):
        sizes.append(len(dataset))
        return original(encoder, dataset, *args, **kwargs)

    monkeypatch.setattr(indexing.extract, "extract_embeddings", counting)
    return sizes


def test_encoder_on_vehicle_layout_skips_broken_and_saves(vehicle_root, tiny_checkpoint, tmp_path, monkeypatch):
    embedded = _count_embedded(monkeypatch)
    saved = tmp_path / "vehicle.npz"
    report = _run(["--data-root", str(vehicle_root), "--encoder", str(tiny_checkpoint), "--ks", "1,2",
                   "--save-embeddings", str(saved), "--batch-size", "5", "--eval-batch-size", "2"])  # fmt: skip
    assert sum(embedded) == sum(len(q) + len(g) for q, g in VEHICLE.values())  # every file once
    assert report["protocol"] == "dyml" and report["skipped"] == 1
    assert list(report["per_level"]) == ["fine", "middle", "coarse"]
    assert list(report["per_level"]["fine"]) == ["R@1", "R@2", "mAP", "ASI"]
    assert report["queries_per_level"] == {"fine": 4, "middle": 3, "coarse": 2}
    assert report["num_queries"] == 9 and report["saved_embeddings"] == str(saved)

    levels = {entry.level: entry for entry in load_dyml_embeddings(saved)}
    # The dataset's own ids, shared by query and gallery; the broken gallery image's row is gone.
    np.testing.assert_array_equal(levels["fine"].query_labels, [7, 3, 7, 3])
    np.testing.assert_array_equal(levels["fine"].gallery_labels, [3, 3, 7, 7, 9])
    np.testing.assert_array_equal(levels["middle"].query_labels, [1, 2, 2])
    np.testing.assert_array_equal(levels["coarse"].gallery_labels, [5, 0, 5])
    assert levels["fine"].gallery.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(levels["middle"].query, axis=1), 1.0, atol=1e-5)

    again = _run(["--embeddings", str(saved), "--ks", "1,2"])
    assert again["per_level"] == report["per_level"] and again["mean"] == report["mean"]
    assert again["skipped"] == 0


def test_product_layout_embeds_the_shared_set_once(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "mini-bmk_all_in_one"
    rows = [(f"{i}.jpg", i // 4, i // 2, i) for i in range(8)]  # coarse, middle, fine ids
    for seed, (name, *_) in enumerate(rows):
        _image(folder / "imgs" / name, seed)
    lines = [f"{name}, {coarse}, {middle}, {fine}" for name, coarse, middle, fine in rows]
    (folder / "label.csv").write_text("fname, coarse_id, middle_id, fine_id\n" + "\n".join(lines) + "\n")
    embedded = _count_embedded(monkeypatch)
    report = _run(["--data-root", str(tmp_path), "--encoder", str(tiny_checkpoint)])
    assert embedded == [8]  # one pass for the three levels
    assert report["queries_per_level"] == {"fine": 8, "middle": 8, "coarse": 8}
    assert report["counted"] == {"fine": 0, "middle": 8, "coarse": 8}  # every fine class is a singleton
    assert report["per_level"]["fine"]["ASI"] is None and report["mean"]["R@1"] is not None


def test_saved_embeddings_without_a_model(tmp_path):
    rng = np.random.default_rng(0)
    levels = []
    for name, classes in (("fine", 6), ("middle", 3), ("coarse", 2)):
        query = rng.normal(size=(12, 8)).astype(np.float32)
        gallery = rng.normal(size=(20, 8)).astype(np.float32)
        query /= np.linalg.norm(query, axis=1, keepdims=True)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        levels.append(
            DymlLevelEmbeddings(name, query, rng.integers(0, classes, 12), gallery, rng.integers(0, classes, 20))
        )
    path = save_dyml_embeddings(tmp_path / "emb.npz", levels)
    expected = evaluate_dyml(levels, ks=(1, 5))

    report = _run(["--embeddings", str(path), "--ks", "1,5", "--eval-batch-size", "3"])
    assert report["per_level"] == expected.to_dict()["per_level"]
    assert report["mean"] == pytest.approx(expected.mean) and report["skipped"] == 0

    table = runner.invoke(app, ["evaluate", "dyml", "--embeddings", str(path)])
    assert table.exit_code == 0, table.output
    assert "DyML protocol" in table.output and "ASI" in table.output and "R@20" in table.output
    for level in ("fine", "middle", "coarse", "mean"):
        assert level in table.output


def test_bad_arguments_are_one_line_errors(tiny_checkpoint, tmp_path):
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, levels=np.array(["fine"]), **{"fine/query": np.eye(2, dtype=np.float32)})
    lonely = save_dyml_embeddings(
        tmp_path / "lonely.npz", [DymlLevelEmbeddings("fine", np.eye(1, 2), np.zeros(1, int))]
    )
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    ckpt = str(tiny_checkpoint)
    cases = [
        ([], "exactly one of"),
        (["--data-root", str(tmp_path), "--embeddings", str(bad_npz)], "exactly one of"),
        (["--data-root", str(tmp_path)], "needs --encoder"),
        (["--embeddings", str(bad_npz), "--encoder", ckpt], "only used with"),
        (["--embeddings", str(bad_npz), "--save-embeddings", str(tmp_path / "o.npz")], "only applies"),
        (["--embeddings", str(bad_npz), "--ks", "0"], "--ks"),
        (["--embeddings", str(bad_npz)], "fine/query_labels"),
        (["--embeddings", str(tmp_path / "missing.npz")], "missing.npz"),
        (["--embeddings", str(lonely)], "leave-one-out retrieval needs two"),
        (["--data-root", str(empty_root), "--encoder", ckpt], "no DyML test set"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, ["evaluate", "dyml", *args])
        assert result.exit_code == 2, (args, result.output)
        output = " ".join(result.output.replace("│", " ").split())  # undo the terminal's line wrapping
        assert expected in output and "Traceback" not in output, (args, result.output)


# --- --query-encoder: a student's symmetric and asymmetric numbers beside its teacher's ---


def _product_root(root: Path) -> Path:
    """A miniature DyML-Product layout: one image set, leave-one-out at every level."""
    folder = root / "mini-bmk_all_in_one"
    rows = [(f"{i}.jpg", i // 6, i // 3, i // 2) for i in range(12)]  # coarse, middle, fine ids
    for seed, (name, *_) in enumerate(rows):
        _image(folder / "imgs" / name, 100 + seed)
    lines = [f"{name}, {coarse}, {middle}, {fine}" for name, coarse, middle, fine in rows]
    (folder / "label.csv").write_text("fname, coarse_id, middle_id, fine_id\n" + "\n".join(lines) + "\n")
    return root


def test_query_encoder_on_vehicle_layout_reports_three_modes(vehicle_root, tiny_checkpoint, make_student, monkeypatch):
    from models import read_checkpoint_info

    student = make_student(tiny_checkpoint)
    embedded = _count_embedded(monkeypatch)
    common = ["--data-root", str(vehicle_root), "--ks", "1,2"]
    report = _run([*common, "--encoder", str(tiny_checkpoint), "--query-encoder", str(student)])
    files = sum(len(q) + len(g) for q, g in VEHICLE.values())
    assert sum(embedded) == 2 * files  # every file once per encoder
    assert report["mode"] == "asymmetric" and report["skipped"] == 1
    assert report["encoder_id"] == read_checkpoint_info(tiny_checkpoint).encoder_id
    assert report["query_encoder_id"] == read_checkpoint_info(student).encoder_id
    teacher_alone = _run([*common, "--encoder", str(tiny_checkpoint)])
    student_alone = _run([*common, "--encoder", str(student)])
    for mode, alone in (("teacher", teacher_alone), ("symmetric", student_alone)):
        assert report[mode]["per_level"] == alone["per_level"] and report[mode]["mean"] == alone["mean"]
    assert list(report["asymmetric"]["per_level"]["fine"]) == ["R@1", "R@2", "mAP", "ASI"]
    assert report["asymmetric"]["per_level"] != report["symmetric"]["per_level"]
    assert report["queries_per_level"] == {"fine": 4, "middle": 3, "coarse": 2}

    table = runner.invoke(app, ["evaluate", "dyml", *common, "--encoder", str(tiny_checkpoint),
                                "--query-encoder", str(student)])  # fmt: skip
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert any(line.split("|")[1:] and "symmetric" in line and "asymmetric" in line for line in lines)
    assert "ASI" in table.output and "skipped 1 unreadable" in table.output


def test_query_encoder_equal_to_the_encoder_scores_the_same_in_every_mode(tiny_checkpoint, tmp_path):
    # On the Product layout the asymmetric mode is leave-one-out against the teacher's copies of the
    # queries: with the teacher as its own query encoder it must equal plain leave-one-out exactly.
    root = _product_root(tmp_path)
    ckpt = str(tiny_checkpoint)
    report = _run(["--data-root", str(root), "--encoder", ckpt, "--query-encoder", ckpt])
    assert report["symmetric"] == report["asymmetric"] == report["teacher"]
    assert report["teacher"]["per_level"] == _run(["--data-root", str(root), "--encoder", ckpt])["per_level"]


def test_query_encoder_of_another_teacher_is_refused(vehicle_root, tiny_checkpoint, make_student, tmp_path):
    from models import read_checkpoint_info

    stranger = make_student("feedfacefeedface", seed=8)
    ckpt = str(tiny_checkpoint)
    result = runner.invoke(
        app, ["evaluate", "dyml", "--data-root", str(vehicle_root), "--encoder", ckpt, "--query-encoder", str(stranger)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    output = " ".join(result.output.split())
    assert read_checkpoint_info(stranger).encoder_id in output and read_checkpoint_info(ckpt).encoder_id in output
    saved = save_dyml_embeddings(tmp_path / "e.npz", [DymlLevelEmbeddings("fine", np.eye(2), np.zeros(2, int))])
    both = ["--data-root", str(vehicle_root), "--encoder", ckpt, "--query-encoder", ckpt]
    for args, expected in (
        (["--embeddings", str(saved), "--query-encoder", ckpt], "--query-encoder needs --data-root"),
        ([*both, "--save-embeddings", str(tmp_path / "o.npz")], "stores one encoder's embeddings"),
    ):
        result = runner.invoke(app, ["evaluate", "dyml", *args])
        assert result.exit_code == 2 and expected in " ".join(result.output.replace("│", " ").split()), result.output
