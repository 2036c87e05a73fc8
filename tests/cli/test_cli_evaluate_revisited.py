"""``retrieval evaluate revisited`` on a miniature ROxford5k in the official layout (gnd pickle + jpg/)."""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.main import app
from retrieval.data.revisited import open_revisited
from retrieval.evaluation.revisited import evaluate_revisited

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()

DB = [f"oxc1_db_{i}" for i in range(6)]
QUERIES = ["oxc1_q_0", "oxc1_q_1"]
GND = {
    "imlist": DB,
    "qimlist": QUERIES,
    "gnd": [
        {"bbx": [2.5, 3.1, 30.2, 25.7], "easy": [0, 1], "hard": [2], "junk": [3]},
        {"bbx": [0.0, 0.0, 48.0, 36.0], "easy": [4], "hard": [], "junk": [5]},
    ],
}
FAST = ["--max-side", "64", "--scales", "1", "--batch-size", "4"]


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(36, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _layout(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(GND))
    for seed, name in enumerate([*DB, *QUERIES]):
        _image(root / "jpg" / f"{name}.jpg", seed)
    return root


@pytest.fixture(scope="module")
def oxford_root(tmp_path_factory) -> Path:
    """``datasets/roxford5k/`` as the revisitop download leaves it; tests pass ``datasets/`` as --data-root."""
    return _layout(tmp_path_factory.mktemp("datasets") / "roxford5k")


def _invoke(args: list[str]):
    return runner.invoke(app, ["evaluate", "revisited", "--dataset", "roxford5k", *args])


def _run_json(args: list[str]) -> dict:
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _count_extractions(monkeypatch, encoders: list[str] | None = None) -> list[int]:
    """Record the size of every dataset extracted (and, in ``encoders``, the id of the encoder used)."""
    import indexing.multiscale

    sizes: list[int] = []
    original = indexing.multiscale.extract_multiscale

    def counting(encoder, dataset, *args, **kwargs):
        sizes.append(len(dataset))
        if encoders is not None:
            encoders.append(encoder.encoder_id)
        return original(encoder, dataset, *args, **kwargs)

    monkeypatch.setattr(indexing.multiscale, "extract_multiscale", counting)
    return sizes


def test_encoder_run_writes_the_cache_and_a_rerun_reuses_it(oxford_root, tiny_checkpoint, tmp_path, monkeypatch):
    extracted = _count_extractions(monkeypatch)
    cache = tmp_path / "cache"
    args = ["--data-root", str(oxford_root.parent), "--encoder", str(tiny_checkpoint), "--cache-dir", str(cache), *FAST]
    start = time.perf_counter()
    first = _run_json(args)
    elapsed = time.perf_counter() - start
    print(f"one full evaluation of the fabricated set (load + extract 8 images + score): {elapsed:.2f}s")
    assert extracted == [2, 6]  # queries, then database
    assert first["protocol"] == "revisited" and first["dataset"] == "roxford5k" and first["mode"] == "symmetric"
    assert first["num_queries"] == 2 and first["num_database"] == 6 and first["distractors"] == 0
    assert first["counted"] == {"easy": 2, "medium": 2, "hard": 1}
    assert set(first["setups"]) == {"easy", "medium", "hard"}
    assert list(first["setups"]["medium"]) == ["mAP", "mP@1", "mP@5", "mP@10"]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and sorted(first["cache"]["written"]) == files
    assert all(first["encoder_id"] in name and "s1-max64" in name for name in files)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    import models

    load_encoder = models.load_encoder

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every feature was cached")

    monkeypatch.setattr(models, "load_encoder", no_model)
    second = _run_json(args)
    assert extracted == [2, 6]  # nothing extracted again
    assert second["setups"] == first["setups"] and sorted(second["cache"]["loaded"]) == files
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes

    table = _invoke(args)  # the printed table, from the cache too
    assert table.exit_code == 0, table.output
    title = next(line for line in table.output.splitlines() if line.startswith("ROxford5k"))
    assert title.startswith("ROxford5k, symmetric:") and "+R1M" not in title and "2 queries" in title
    assert all(setup in table.output for setup in ("easy", "medium", "hard", "mP@10", "loaded cached features"))

    # other scales are another cache entry; distractor features (.npy) are appended to the database
    monkeypatch.setattr(models, "load_encoder", load_encoder)
    np.save(tmp_path / "distractors.npy", np.ones((4, 32), np.float32) / np.sqrt(32))
    plus = _run_json([*args, "--scales", "1,0.5", "--distractors", str(tmp_path / "distractors.npy")])
    assert extracted == [2, 6, 2, 6] and len(list(cache.iterdir())) == 4
    assert plus["distractors"] == 4 and plus["num_database"] == 10


def test_asymmetric_mode_embeds_queries_with_the_query_encoder(oxford_root, tiny_checkpoint, make_student, monkeypatch):
    from models import read_checkpoint_info

    teacher_id = read_checkpoint_info(tiny_checkpoint).encoder_id
    student = make_student(tiny_checkpoint)
    encoders: list[str] = []
    sizes = _count_extractions(monkeypatch, encoders)
    args = ["--data-root", str(oxford_root), "--encoder", str(tiny_checkpoint), "--query-encoder", str(student)]
    report = _run_json([*args, *FAST])
    assert report["mode"] == "asymmetric" and report["query_encoder_id"] != report["encoder_id"] == teacher_id
    assert list(zip(sizes, encoders, strict=True)) == [(2, report["query_encoder_id"]), (6, report["encoder_id"])]
    assert report["notes"] == []


def test_asymmetric_mode_refuses_a_student_of_another_teacher(oxford_root, tiny_checkpoint, make_student, monkeypatch):
    from models import read_checkpoint_info

    stranger = make_student("0123456789abcdef", seed=4)
    sizes = _count_extractions(monkeypatch)
    args = ["--data-root", str(oxford_root), "--encoder", str(tiny_checkpoint), "--query-encoder", str(stranger)]
    result = _invoke([*args, *FAST])
    assert result.exit_code == 2 and "Traceback" not in result.output and sizes == []  # refused before extracting
    message = _flat(result.output)
    for encoder_id in (read_checkpoint_info(stranger).encoder_id, read_checkpoint_info(tiny_checkpoint).encoder_id):
        assert encoder_id in message
    assert "teacher 0123456789abcdef" in message and "not distilled against" in message


def test_asymmetric_mode_needs_the_same_dimension(oxford_root, tiny_checkpoint, tiny_encoder_config, tmp_path):
    from models import Encoder, save_encoder

    other = tmp_path / "wide"
    save_encoder(Encoder(tiny_encoder_config.model_copy(update={"embedding_dim": 16})), other)
    result = _invoke(
        ["--data-root", str(oxford_root), "--encoder", str(tiny_checkpoint), "--query-encoder", str(other), *FAST]
    )
    assert result.exit_code == 2
    assert "16 dimensions" in _flat(result.output) and "Traceback" not in result.output


def test_saved_features_and_distractors_without_images(oxford_root, tmp_path):
    root = tmp_path / "gnd-only"
    root.mkdir()
    shutil.copy(oxford_root / "gnd_roxford5k.pkl", root)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(2, 8)).astype(np.float32)
    database = rng.normal(size=(6, 8)).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "db.npy", database)
    features = f"{tmp_path / 'q.npy'},{tmp_path / 'db.npy'}"
    report = _run_json(["--data-root", str(root), "--features", features])
    ground_truth = open_revisited("roxford5k", root, require_images=False).ground_truth
    assert report["mode"] == "saved features"
    _assert_setups(report, evaluate_revisited(queries, database, ground_truth).to_dict())

    # +R1M: distractors more similar to every query than any database image push every positive down
    distractors = np.concatenate([queries * 10, rng.normal(size=(3, 8)).astype(np.float32)])
    np.save(tmp_path / "distractors.npy", distractors)
    plus_args = ["--data-root", str(root), "--features", features, "--distractors", str(tmp_path / "distractors.npy")]
    plus = _run_json(plus_args)
    assert plus["distractors"] == 5 and plus["num_database"] == 11
    _assert_setups(plus, evaluate_revisited(queries, database, ground_truth, distractors=distractors).to_dict())
    assert plus["setups"]["medium"]["mAP"] < report["setups"]["medium"]["mAP"]
    table = _invoke(plus_args)
    assert table.exit_code == 0 and "ROxford5k +R1M (5 distractors), saved features" in table.output


def test_distractor_folder_is_embedded_and_unreadable_distractors_are_left_out(oxford_root, tiny_checkpoint, tmp_path):
    folder = tmp_path / "r1m"
    for seed in range(3):
        _image(folder / "0" / f"{seed}.jpg", 100 + seed)
    (folder / "0" / "broken.jpg").write_bytes(b"not a jpeg")
    base = ["--data-root", str(oxford_root), "--encoder", str(tiny_checkpoint), *FAST]
    report = _run_json([*base, "--distractors", str(folder)])
    assert report["distractors"] == 3 and report["skipped_distractors"] == 1
    assert report["num_database"] == 9


def _assert_setups(got: dict, expected: dict) -> None:
    assert list(got["setups"]) == list(expected["setups"])
    for setup, metrics in expected["setups"].items():
        assert got["setups"][setup] == pytest.approx(metrics), setup


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())  # undo the terminal's line wrapping and box


def test_unreadable_query_or_database_image_stops_the_run(oxford_root, tiny_checkpoint, tmp_path):
    for broken in (f"{QUERIES[1]}.jpg", f"{DB[2]}.jpg"):
        root = tmp_path / broken / "roxford5k"
        shutil.copytree(oxford_root, root)
        (root / "jpg" / broken).write_bytes(b"")
        result = _invoke(["--data-root", str(root), "--encoder", str(tiny_checkpoint), *FAST])
        output = _flat(result.output)
        assert result.exit_code == 2, result.output
        assert "error: 1 unreadable" in output and broken in output and "Traceback" not in output
        assert ("query" if broken.startswith("oxc1_q") else "database") in output


def test_bad_arguments_are_one_line_errors(oxford_root, tiny_checkpoint, tmp_path):
    np.save(tmp_path / "q.npy", np.eye(2, 4, dtype=np.float32))
    np.save(tmp_path / "db.npy", np.eye(6, 4, dtype=np.float32))
    np.save(tmp_path / "db3.npy", np.eye(6, 3, dtype=np.float32))
    np.save(tmp_path / "short.npy", np.eye(5, 4, dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.ones(6, dtype=np.float32))
    np.save(tmp_path / "nan.npy", np.full((6, 4), np.nan, dtype=np.float32))
    np.save(tmp_path / "d3.npy", np.ones((2, 3), dtype=np.float32))
    (tmp_path / "text.npy").write_text("not numpy")
    q, root, ckpt = str(tmp_path / "q.npy"), str(oxford_root), str(tiny_checkpoint)

    def feats(db: str) -> list[str]:
        return ["--data-root", root, "--features", f"{q},{tmp_path / db}"]

    cases = [
        (["--data-root", root], "exactly one of"),
        (["--data-root", root, "--encoder", ckpt, "--features", f"{q},{q}"], "exactly one of"),
        ([*feats("db.npy"), "--query-encoder", ckpt], "only apply"),
        ([*feats("db.npy"), "--distractors", str(tmp_path)], "must be a .npy file"),
        ([*feats("db.npy"), "--distractors", str(tmp_path / "none")], "--distractors not found"),
        ([*feats("db.npy"), "--distractors", str(tmp_path / "d3.npy")], "dimension 3"),
        (["--data-root", root, "--features", q], "QUERY.npy,DB.npy"),
        (feats("missing.npy"), "missing.npy"),
        (feats("short.npy"), "5 database rows but roxford5k has 6"),
        (["--data-root", root, "--features", f"{tmp_path / 'db.npy'},{tmp_path / 'db.npy'}"], "6 query rows"),
        (feats("db3.npy"), "dimension 4 but database features 3"),
        (feats("flat.npy"), "2-D"),
        (feats("text.npy"), "not a .npy array file"),
        (feats("nan.npy"), "NaN"),
        (["--data-root", root, "--encoder", ckpt, "--scales", "1,x"], "--scales"),
        (["--data-root", str(tmp_path), "--encoder", ckpt], "gnd_roxford5k.pkl"),
        (["--data-root", root, "--encoder", str(tmp_path)], "not an encoder checkpoint"),
    ]
    for args, expected in cases:
        result = _invoke(args)
        assert result.exit_code == 2, (args, result.output)
        output = _flat(result.output)
        assert expected in output and "Traceback" not in output, (args, result.output)
    unknown = runner.invoke(
        app, ["evaluate", "revisited", "--dataset", "oxford5k", "--data-root", root, "--encoder", ckpt]
    )
    assert unknown.exit_code == 2 and "roxford5k, rparis6k" in _flat(unknown.output)
