"""evaluate_asymmetric: symmetric, asymmetric and teacher leave-one-out reports, and the side-by-side table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.evaluation import evaluate_asymmetric, evaluate_embeddings, format_side_by_side
from retrieval.evaluation.asymmetric import MODES


def _pair(n: int = 48, seed: int = 0, noise: float = 0.4):
    """A student that lands near its teacher (the AML goal) and hierarchical labels for the items."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, 16)).astype(np.float32)
    student = teacher + noise * rng.normal(size=teacher.shape).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    student /= np.linalg.norm(student, axis=1, keepdims=True)
    fine = rng.integers(0, 8, size=n)
    return student, teacher, np.stack([fine, fine // 2, fine // 4], axis=1)


def test_the_three_reports_are_the_three_leave_one_out_evaluations():
    student, teacher, labels = _pair()
    reports = evaluate_asymmetric(student, teacher, labels, ks=(1, 4), batch_size=10)
    assert list(reports) == list(MODES) == ["symmetric", "asymmetric", "teacher"]
    assert reports["symmetric"] == evaluate_embeddings(student, labels, ks=(1, 4))
    assert reports["teacher"] == evaluate_embeddings(teacher, labels, ks=(1, 4))
    expected = evaluate_embeddings(student, labels, teacher, labels, ks=(1, 4), exclude_self=True)
    assert reports["asymmetric"] == expected
    assert reports["asymmetric"] != evaluate_embeddings(student, labels, teacher, labels, ks=(1, 4))  # self counted
    assert reports["symmetric"].levels == ["fine", "middle", "coarse"]


def test_a_student_equal_to_its_teacher_scores_the_teacher_in_every_mode():
    _, teacher, labels = _pair()
    reports = evaluate_asymmetric(torch.from_numpy(teacher), teacher, labels, ks=(1, 5), asi=True)
    assert reports["symmetric"] == reports["asymmetric"] == reports["teacher"]
    assert reports["asymmetric"].metric_names == ["R@1", "R@5", "mAP", "ASI"]


def test_optional_parts_and_mismatched_sides():
    student, teacher, labels = _pair()
    assert list(evaluate_asymmetric(student, None, labels)) == ["symmetric"]
    assert list(evaluate_asymmetric(student, teacher, labels, include_teacher=False)) == ["symmetric", "asymmetric"]
    with pytest.raises(ValueError, match=r"student_emb has shape \(48, 16\) but teacher_emb \(47, 16\)"):
        evaluate_asymmetric(student, teacher[:47], labels)
    with pytest.raises(ValueError, match="same items"):
        evaluate_asymmetric(student, teacher[:, :8], labels)


def test_side_by_side_table_lines_up_the_reports():
    student, teacher, labels = _pair()
    reports = evaluate_asymmetric(student, teacher, labels, schema=("fine", "middle", "coarse"), ks=(1, 4))
    table = format_side_by_side(reports, title="title line")
    lines = table.splitlines()
    assert lines[0] == "title line"
    assert [part.strip() for part in lines[1].split("|")] == ["", "symmetric", "asymmetric", "teacher"]
    assert lines[2].split() == ["level", "|", "R@1", "R@4", "mAP", "|", "R@1", "R@4", "mAP", "|", "R@1", "R@4", "mAP"]
    rows = {line.split()[0]: line.split() for line in lines[4:] if not line.startswith("-")}
    assert list(rows) == ["fine", "middle", "coarse", "mean"]
    assert rows["fine"][-1] == f"{100 * reports['teacher'].per_level['fine']['mAP']:.2f}"
    assert rows["mean"][6] == f"{100 * reports['asymmetric'].mean['R@1']:.2f}"
    assert len({line.index("|") for line in lines[1:] if "|" in line}) == 1  # the columns line up
    with pytest.raises(ValueError, match="only reports of one protocol"):
        format_side_by_side({"a": reports["symmetric"], "b": evaluate_embeddings(student, labels, ks=(1,))})
    with pytest.raises(ValueError, match="at least one report"):
        format_side_by_side({})
