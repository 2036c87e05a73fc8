"""AML pairing everywhere a query encoder meets a gallery: a student of the index's teacher is accepted, a student
of another teacher is refused with a message naming both ids, by the engine, ``retrieval search``, the HTTP app
(at start-up), ``retrieval serve``, ``retrieval index calibrate``, ``retrieval evaluate recall`` and an ONNX export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from indexing import open_index_dir
from models import read_checkpoint_info
from retrieval.cli.main import app as cli
from serving.app import create_app, serve
from serving.engine import EncoderMismatchError, SearchEngine
from serving.settings import ServeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
OTHER_TEACHER = "0badc0ffee0badc0"  # an encoder id that built nothing here


@pytest.fixture(scope="module")
def teacher_id(serving_index, tiny_checkpoint) -> str:
    """The id of the encoder that built the serving index (the teacher of the good student)."""
    with open_index_dir(serving_index) as index_dir:
        encoder_id = index_dir.manifest.encoder_id
    assert encoder_id == read_checkpoint_info(tiny_checkpoint).encoder_id
    return encoder_id


@pytest.fixture(scope="module")
def good_student(make_student, tiny_checkpoint) -> Path:
    return make_student(tiny_checkpoint, seed=21)


@pytest.fixture(scope="module")
def bad_student(make_student) -> Path:
    return make_student(OTHER_TEACHER, seed=22)


def _ids(path: Path) -> tuple[str, str | None]:
    info = read_checkpoint_info(path)
    return info.encoder_id, info.config.teacher_id


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())  # undo the terminal's line wrapping


def _assert_names_both(message: str, student: Path, teacher_id: str) -> None:
    student_id, _ = _ids(student)
    assert student_id in message and teacher_id in message, message


def _query_image(serving_gallery: Path) -> Path:
    return serving_gallery.parent / "img_0.png"


def test_engine_accepts_the_student_and_refuses_one_of_another_teacher(
    serving_index, good_student, bad_student, teacher_id
):
    with SearchEngine.open(serving_index, good_student) as engine:
        assert engine.query_encoder.teacher_id == teacher_id != engine.query_encoder.encoder_id
    with pytest.raises(EncoderMismatchError) as err:
        SearchEngine.open(serving_index, bad_student)
    _assert_names_both(str(err.value), bad_student, teacher_id)
    assert OTHER_TEACHER in str(err.value)


def test_search_cli(serving_index, serving_gallery, good_student, bad_student, teacher_id):
    base = ["search", "--index", str(serving_index), str(_query_image(serving_gallery)), "--k", "3", "--json"]
    good = runner.invoke(cli, [*base, "--query-encoder", str(good_student)])
    assert good.exit_code == 0, good.output
    assert len(json.loads(good.stdout)["results"][0]["hits"]) == 3
    bad = runner.invoke(cli, [*base, "--query-encoder", str(bad_student)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    _assert_names_both(_flat(bad.output), bad_student, teacher_id)


def test_http_app_refuses_at_start_up_and_serves_the_student(serving_index, good_student, bad_student, teacher_id):
    bad_app = create_app(ServeSettings(index=serving_index, query_encoder=bad_student))
    with pytest.raises(EncoderMismatchError) as err, TestClient(bad_app):
        pass  # the lifespan (server start-up) opens the engine, before any request
    _assert_names_both(str(err.value), bad_student, teacher_id)
    with pytest.raises(EncoderMismatchError):
        serve(ServeSettings(index=serving_index, query_encoder=bad_student))  # before uvicorn starts

    with TestClient(create_app(ServeSettings(index=serving_index, query_encoder=good_student))) as client:
        served = client.get("/v1/index").json()
    assert served["encoder_id"] == teacher_id and served["query_encoder_id"] == _ids(good_student)[0]
    assert served["query_encoder_teacher_id"] == teacher_id


def test_serve_cli_refuses_before_listening(serving_index, good_student, bad_student, teacher_id, monkeypatch):
    import uvicorn

    started: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    bad = runner.invoke(cli, ["serve", "--index", str(serving_index), "--query-encoder", str(bad_student)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and started == []
    _assert_names_both(_flat(bad.output), bad_student, teacher_id)
    good = runner.invoke(cli, ["serve", "--index", str(serving_index), "--query-encoder", str(good_student)])
    assert good.exit_code == 0, good.output
    assert len(started) == 1  # the server would start, with the student's engine


def test_index_calibrate(serving_index, serving_gallery, good_student, bad_student, teacher_id, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(serving_index, index)
    base = ["index", "calibrate", str(index), "--labels", str(serving_gallery), "--batch-size", "4", "--json"]
    bad = runner.invoke(cli, [*base, "--encoder", str(bad_student)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    _assert_names_both(_flat(bad.output), bad_student, teacher_id)
    with open_index_dir(index) as index_dir:
        assert not index_dir.manifest.thresholds  # untouched
    good = runner.invoke(cli, [*base, "--encoder", str(good_student)])
    assert good.exit_code == 0, good.output
    assert set(json.loads(good.stdout)["thresholds"]) == {"fine", "middle", "coarse"}


def test_evaluate_recall(serving_gallery, tiny_checkpoint, good_student, bad_student, teacher_id):
    base = ["evaluate", "recall", "--images", str(serving_gallery), "--encoder", str(tiny_checkpoint), "--ks", "1,2"]
    report = json.loads(_ok(runner.invoke(cli, [*base, "--query-encoder", str(good_student), "--json"])))
    assert report["mode"] == "asymmetric" and report["skipped"] == 0
    assert report["encoder_id"] == teacher_id and report["query_encoder_id"] == _ids(good_student)[0]
    teacher_alone = json.loads(_ok(runner.invoke(cli, [*base, "--json"])))
    assert report["teacher"]["per_level"] == teacher_alone["per_level"]
    student_alone = ["evaluate", "recall", "--images", str(serving_gallery), "--encoder", str(good_student)]
    student_report = json.loads(_ok(runner.invoke(cli, [*student_alone, "--ks", "1,2", "--json"])))
    assert report["symmetric"]["per_level"] == student_report["per_level"]
    assert list(report["asymmetric"]["per_level"]) == ["fine", "middle", "coarse"]
    table = runner.invoke(cli, [*base, "--query-encoder", str(good_student)])
    assert table.exit_code == 0 and "asymmetric" in table.output and teacher_id in _flat(table.output)

    bad = runner.invoke(cli, [*base, "--query-encoder", str(bad_student)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    _assert_names_both(_flat(bad.output), bad_student, teacher_id)
    assert "not distilled against" in _flat(bad.output)


def _ok(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


def test_onnx_student_keeps_its_teacher_and_is_paired_the_same_way(
    serving_index, good_student, bad_student, teacher_id, tmp_path
):
    from serving.export import export_onnx
    from serving.onnx_metadata import read_onnx_metadata

    good_onnx = export_onnx(good_student, tmp_path / "good.onnx").path
    bad_onnx = export_onnx(bad_student, tmp_path / "bad.onnx").path
    good_meta, bad_meta = read_onnx_metadata(good_onnx), read_onnx_metadata(bad_onnx)
    assert (good_meta.encoder_id, good_meta.teacher_id) == _ids(good_student) and good_meta.teacher_id == teacher_id
    assert (bad_meta.encoder_id, bad_meta.teacher_id) == _ids(bad_student) == (bad_meta.encoder_id, OTHER_TEACHER)

    with SearchEngine.open(serving_index, good_onnx) as engine:
        assert engine.query_encoder.teacher_id == teacher_id
    with pytest.raises(EncoderMismatchError) as err:
        SearchEngine.open(serving_index, bad_onnx)
    _assert_names_both(str(err.value), bad_student, teacher_id)
    bad_app = create_app(ServeSettings(index=serving_index, query_encoder=bad_onnx))
    with pytest.raises(EncoderMismatchError), TestClient(bad_app):
        pass
