"""Symmetric versus asymmetric retrieval of a distilled student (AML, Budnik & Avrithis, CVPR 2021).

A student trained with Asymmetric Metric Learning is meant to embed *queries* into its teacher's
space, while the gallery stays embedded by the teacher. Its quality is therefore read in two ways
(METHODS.md, AML "Evaluation"):

- **symmetric**: the student on both sides (what the student alone has learnt);
- **asymmetric**: student queries against a teacher gallery (what the deployed pairing delivers).

The teacher on both sides is the ceiling the asymmetric number tries to reach. All three are
leave-one-out over one labelled set: both encoders embed the same items, and in the asymmetric
case query ``i`` must not retrieve gallery item ``i``, its own image embedded by the teacher
(:func:`~retrieval.evaluation.protocols.evaluate_embeddings` with ``exclude_self``).

Pure numpy (like the rest of :mod:`retrieval.evaluation`), so the distillation trainer and the
CLI score the pairing with the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from retrieval.data.labels import LabelSchema
from retrieval.evaluation.protocols import as_embeddings, evaluate_embeddings
from retrieval.evaluation.report import EvaluationReport

__all__ = ["ASYMMETRIC", "MODES", "SYMMETRIC", "TEACHER", "evaluate_asymmetric"]

SYMMETRIC = "symmetric"
"""Student queries against a student gallery."""
ASYMMETRIC = "asymmetric"
"""Student queries against a teacher gallery (the deployed AML pairing)."""
TEACHER = "teacher"
"""Teacher queries against a teacher gallery (the ceiling)."""
MODES: tuple[str, ...] = (SYMMETRIC, ASYMMETRIC, TEACHER)
"""Report keys in display order."""


def evaluate_asymmetric(
    student_emb: Any,
    teacher_emb: Any | None,
    labels: Any,
    schema: LabelSchema | Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    asi: bool = False,
    *,
    batch_size: int = 1024,
    include_teacher: bool = True,
) -> dict[str, EvaluationReport]:
    """Leave-one-out reports of a student, of its pairing with the teacher, and of the teacher.

    Row ``i`` of ``student_emb`` and of ``teacher_emb`` must be the same item (``labels[i]``). The
    teacher's own report does not change while a student trains; pass ``include_teacher=False`` to
    skip it during training and save one full evaluation.

    Args:
        student_emb: ``(N, D)`` L2-normalised student (query encoder) embeddings, numpy or torch.
        teacher_emb: ``(N, D)`` teacher (gallery encoder) embeddings of the same items, same ``D``;
            ``None`` scores the student alone (only ``"symmetric"`` is returned).
        labels: ``(N, L)`` integer labels, column 0 the finest level (``(N,)`` means one level).
        schema: level names, as for :func:`~retrieval.evaluation.protocols.evaluate_embeddings`.
        ks: Recall@K cut-offs.
        asi: also report the DyML Average Search Index.
        batch_size: queries per similarity chunk.
        include_teacher: add the ``"teacher"`` report (teacher on both sides).

    Returns:
        ``{"symmetric": ..., "asymmetric": ..., "teacher": ...}`` (keys in :data:`MODES` order; only
        ``"symmetric"`` without a teacher, no ``"teacher"`` with ``include_teacher=False``).

    Raises:
        ValueError: the student and teacher embeddings differ in length or dimension (they must be
            the same items in one space), or anything ``evaluate_embeddings`` rejects.
    """
    options: dict[str, Any] = {"schema": schema, "ks": ks, "batch_size": batch_size, "asi": asi}
    reports = {SYMMETRIC: evaluate_embeddings(student_emb, labels, **options)}
    if teacher_emb is None:
        return reports
    student = as_embeddings(student_emb, "student_emb")
    teacher = as_embeddings(teacher_emb, "teacher_emb")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student_emb has shape {student.shape} but teacher_emb {teacher.shape}; asymmetric evaluation needs "
            "the same items (rows) embedded into one space (columns) by both encoders"
        )
    reports[ASYMMETRIC] = evaluate_embeddings(student, labels, teacher, labels, exclude_self=True, **options)
    if include_teacher:
        reports[TEACHER] = evaluate_embeddings(teacher, labels, **options)
    return reports
