"""`retrieval distill` end to end on a fabricated SfM-120k layout: the student, its teacher id, the refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from models.checkpoint import load_encoder
from retrieval.cli.main import app
from retrieval.data.sfm120k import SFM120K, cid_to_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sfm_layout(root: Path) -> Path:
    """Six clusters of four images (distinct colours per cluster), the official pairs, a small val split."""
    cids = [f"{n:014x}" for n in range(24)]
    clusters = [n // 4 for n in range(24)]
    layout = {
        "train": {"cids": cids[:20], "cluster": clusters[:20], "qidxs": [0, 4, 8], "pidxs": [1, 5, 9]},
        "val": {"cids": cids[20:], "cluster": [7, 7, 8, 8], "qidxs": [0], "pidxs": [1]},
    }
    root.mkdir(parents=True)
    with open(root / f"{SFM120K}.pkl", "wb") as fh:
        pickle.dump(layout, fh)
    for n, cid in enumerate(cids):
        path = cid_to_path(root / "ims", cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            Image.new("RGB", (40, 30), (40 * (n // 4), 10 * (n % 4), 200 - 30 * (n // 4))).save(fh, format="PNG")
    return root


def _distill_args(root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill", "--config", "aml-synthetic-cpu", "--teacher", str(teacher), "--out", str(out), "--json",
        "--set", "data.source=sfm120k", "--set", f"data.sfm120k_root={root}",
        "--set", "loss.name=aml_contrastive_plus", "--set", "schedule.max_steps=3",
        "--set", "sampler.classes_per_batch=3", "--set", "sampler.images_per_class=2",
        "--set", "model.preprocess.input_size=32", "--set", "device=cpu", *extra,
    ]  # fmt: skip


def test_distill_writes_a_student_of_the_teacher_and_refuses_another_teachers_cache(
    tmp_path, tiny_checkpoint, make_checkpoint
):
    root = _sfm_layout(tmp_path / "sfm")
    runner = CliRunner()
    result = runner.invoke(app, _distill_args(root, tiny_checkpoint, tmp_path / "student"))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    teacher_id = load_encoder(tiny_checkpoint).encoder_id
    assert summary["teacher_id"] == teacher_id and summary["steps"] == 3
    assert set(summary["evaluation"]) == {"symmetric", "asymmetric", "teacher"}
    student = load_encoder(summary["encoder_path"])
    assert student.config.teacher_id == teacher_id and student.embedding_dim == 32
    (cache,) = (tmp_path / "student" / "teacher-cache").iterdir()

    other = make_checkpoint(21)
    other_id = load_encoder(other).encoder_id
    refused = runner.invoke(
        app, _distill_args(root, other, tmp_path / "other", "--set", f"distill.teacher_embeddings={cache}")
    )
    assert refused.exit_code == 2
    assert teacher_id in refused.output and other_id in refused.output and "Traceback" not in refused.output


def test_distill_without_a_teacher_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["distill", "--config", "aml-synthetic-cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "distill.teacher is required" in result.output and "Traceback" not in result.output
