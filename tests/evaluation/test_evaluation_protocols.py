"""evaluate_embeddings: leave-one-out, gallery mode, per-level exclusion, chunking, and a naive loop reference."""

import json
import logging
import math

import numpy as np
import pytest
import torch

from retrieval.data.labels import LabelSchema
from retrieval.evaluation import evaluate_embeddings

# Four unit vectors on a quarter circle. Inner products:
#   e0.e1 = 0.8, e0.e2 = 0.6, e0.e3 = 0, e1.e2 = 0.96, e1.e3 = 0.6, e2.e3 = 0.8 (self = 1).
ARC = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)


def test_leave_one_out_excludes_self_hand_worked():
    labels = np.array([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=np.int64)  # fine, coarse
    # Fine-level rankings of the *other* items (by score), relevance in brackets:
    #   q0 (fine 0): e1 .8 [0], e2 .6 [1], e3 0 [0]  -> first hit rank 2, AP = 1/2
    #   q1 (fine 1): e2 .96 [0], e0 .8 [0], e3 .6 [1] -> first hit rank 3, AP = 1/3
    #   q2 (fine 0): e1 .96 [0], e3 .8 [0], e0 .6 [1] -> first hit rank 3, AP = 1/3
    #   q3 (fine 1): e2 .8 [0], e1 .6 [1], e0 0 [0]  -> first hit rank 2, AP = 1/2
    # R@1 = 0, R@2 = 2/4, R@3 = 1, mAP = (1/2 + 1/3 + 1/3 + 1/2) / 4 = 5/12.
    # Had the query found itself (score 1), fine R@1 would be 1.
    # Coarse: every other item is relevant -> R@K = 1, mAP = 1.
    report = evaluate_embeddings(ARC, labels, schema=("fine", "coarse"), ks=(1, 2, 3))
    fine = report.per_level["fine"]
    assert fine["R@1"] == 0.0
    assert fine["R@2"] == pytest.approx(0.5)
    assert fine["R@3"] == pytest.approx(1.0)
    assert fine["mAP"] == pytest.approx(5 / 12)
    assert report.per_level["coarse"] == pytest.approx({"R@1": 1.0, "R@2": 1.0, "R@3": 1.0, "mAP": 1.0})
    assert report.mean["R@1"] == pytest.approx(0.5)
    assert report.mean["mAP"] == pytest.approx((5 / 12 + 1) / 2)
    assert report.num_queries == 4
    assert report.counted == {"fine": 4, "coarse": 4}


def test_queries_without_positive_are_left_out(caplog):
    labels = np.array([[0, 0], [0, 0], [1, 0], [2, 0]], dtype=np.int64)  # fine classes 1 and 2 are singletons
    # Fine: q0 ranks e1 .8 [1], e2 [0], e3 [0] -> R@1 = 1, AP = 1
    #       q1 ranks e2 .96 [0], e0 .8 [1], e3 [0] -> R@1 = 0, AP = 1/2
    #       q2, q3 have no other item of their class -> left out (not counted as misses).
    # R@1 = 1/2 (would be 1/4 if they counted as zeros); mAP = 3/4 (would be 3/8).
    with caplog.at_level(logging.INFO, logger="retrieval.evaluation.protocols"):
        report = evaluate_embeddings(ARC, labels, schema=("fine", "coarse"), ks=(1,))
    assert report.per_level["fine"] == pytest.approx({"R@1": 0.5, "mAP": 0.75})
    assert report.counted == {"fine": 2, "coarse": 4}
    assert report.num_queries == 4
    assert "2 of 4 queries have no relevant item" in caplog.text


def test_level_without_any_positive_is_nan_and_skipped_in_mean():
    labels = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=np.int64)  # every fine class is a singleton
    report = evaluate_embeddings(ARC, labels, schema=("fine", "coarse"), ks=(1,))
    assert math.isnan(report.per_level["fine"]["R@1"]) and math.isnan(report.per_level["fine"]["mAP"])
    assert report.counted["fine"] == 0
    assert report.mean == pytest.approx({"R@1": 1.0, "mAP": 1.0})  # only the coarse level is defined
    assert report.to_dict()["per_level"]["fine"] == {"R@1": None, "mAP": None}
    json.dumps(report.to_dict(), allow_nan=False)


def test_gallery_mode_does_not_exclude_anything():
    # Query = e0 (fine 0); gallery = all four arc points. With a gallery the identical item e0 is a
    # legitimate hit (rank 1, score 1): gallery fine labels [0, 1, 1, 0] -> relevance [1, 0, 0, 1]
    # (ranking e0 1.0, e1 .8, e2 .6, e3 0) -> R@1 = 1, AP = (1/1 + 2/4) / 2 = 0.75.
    report = evaluate_embeddings(
        ARC[:1], np.array([[0]]), ARC, np.array([[0], [1], [1], [0]]), schema=("fine",), ks=(1, 2)
    )
    assert report.per_level["fine"] == pytest.approx({"R@1": 1.0, "R@2": 1.0, "mAP": 0.75})
    assert report.counted == {"fine": 1}


def _grid_data(n: int, seed: int):
    # Small dyadic entries: every inner product is exact in float32 whatever the BLAS blocking,
    # and there are many exact ties, which is what chunking must not disturb.
    rng = np.random.default_rng(seed)
    emb = rng.integers(-2, 3, size=(n, 6)).astype(np.float32) / 4
    fine = rng.integers(0, n // 4, size=n)
    return emb, np.stack([fine, fine // 3, fine // 9], axis=1)


def test_chunking_gives_identical_reports():
    emb, labels = _grid_data(157, seed=1)
    reference = evaluate_embeddings(emb, labels, ks=(1, 5, 10), batch_size=10_000)
    for batch_size in (1, 7, 64, 156):
        assert evaluate_embeddings(emb, labels, ks=(1, 5, 10), batch_size=batch_size) == reference
    gallery, gallery_labels = _grid_data(90, seed=2)
    reference = evaluate_embeddings(emb, labels, gallery, gallery_labels, batch_size=10_000)
    for batch_size in (1, 13, 100):
        assert evaluate_embeddings(emb, labels, gallery, gallery_labels, batch_size=batch_size) == reference


def _naive_level_metrics(scores, query_labels, gallery_labels, ks, leave_one_out):
    """Loop-based reference: sort by (-score, index), skip self, compute hit@K and AP by definition."""
    hits = {k: [] for k in ks}
    aps = []
    for i in range(len(scores)):
        order = sorted(range(scores.shape[1]), key=lambda j: (-float(scores[i, j]), j))
        if leave_one_out:
            order = [j for j in order if j != i]
        relevant = [gallery_labels[j] == query_labels[i] for j in order]
        if not any(relevant):
            continue
        first = relevant.index(True)
        for k in ks:
            hits[k].append(first < k)
        found, precisions = 0, []
        for rank, rel in enumerate(relevant, start=1):
            if rel:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / found)
    return {**{f"R@{k}": float(np.mean(hits[k])) for k in ks}, "mAP": float(np.mean(aps))}


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_matches_naive_loop_reference(leave_one_out):
    rng = np.random.default_rng(7)
    emb = rng.normal(size=(80, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    fine = rng.integers(0, 20, size=80)
    labels = np.stack([fine, fine // 4], axis=1)
    ks = (1, 2, 4, 8)
    if leave_one_out:
        queries, q_labels, gallery, g_labels = emb, labels, emb, labels
        report = evaluate_embeddings(emb, labels, schema=("fine", "coarse"), ks=ks, batch_size=16)
    else:
        queries, q_labels, gallery, g_labels = emb[:30], labels[:30], emb[30:], labels[30:]
        report = evaluate_embeddings(queries, q_labels, gallery, g_labels, schema=("fine", "coarse"), ks=ks)
    scores = queries @ gallery.T
    for column, level in enumerate(("fine", "coarse")):
        expected = _naive_level_metrics(scores, q_labels[:, column], g_labels[:, column], ks, leave_one_out)
        assert report.per_level[level] == pytest.approx(expected, abs=1e-12)


def test_accepts_torch_tensors_and_1d_labels():
    emb = torch.from_numpy(ARC).requires_grad_(True)
    labels = torch.tensor([0, 1, 0, 1])
    report = evaluate_embeddings(emb, labels, ks=(1, 2))
    assert report.levels == ["fine"]
    assert report.per_level["fine"]["R@2"] == pytest.approx(0.5)
    assert evaluate_embeddings(emb.to(torch.bfloat16), labels, ks=(1, 2)) == report


def test_default_schema_and_level_selection():
    labels = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    assert evaluate_embeddings(ARC, labels).levels == ["fine", "middle", "coarse"]
    assert evaluate_embeddings(ARC, labels[:, :2]).levels == ["level0", "level1"]
    schema = LabelSchema(("a", "b", "c"))
    report = evaluate_embeddings(ARC, labels, schema=schema, levels=["c", "a"], ks=(1,))
    assert report.levels == ["c", "a"]
    assert report.metric_names == ["R@1", "mAP"]


def test_warns_when_embeddings_are_not_normalised(caplog):
    with caplog.at_level(logging.WARNING, logger="retrieval.evaluation.protocols"):
        evaluate_embeddings(ARC * 2, np.array([0, 1, 0, 1]))
    assert "not L2-normalised" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"query_labels": np.zeros((3, 1), dtype=np.int64)}, "3 rows but there are 4 embeddings"),
        ({"query_labels": np.zeros((4, 1), dtype=np.float32)}, "integer class ids"),
        ({"query_emb": np.full((4, 2), np.nan, dtype=np.float32)}, "NaN or inf"),
        ({"query_emb": ARC[:, 0]}, r"query_emb must have shape \(N, D\)"),
        ({"gallery_emb": ARC}, "without gallery_labels"),
        ({"gallery_labels": np.zeros((4, 1), dtype=np.int64)}, "without gallery_emb"),
        ({"gallery_emb": np.zeros((4, 3), np.float32), "gallery_labels": np.zeros((4, 1), np.int64)}, "dimension"),
        ({"gallery_emb": ARC, "gallery_labels": np.zeros((4, 2), np.int64)}, "1 levels but gallery_labels has 2"),
        ({"schema": ("fine", "coarse")}, "schema has 2 levels"),
        ({"ks": (1, 0)}, "positive integer"),
        ({"ks": (5, 5)}, "repeat"),
        ({"batch_size": 0}, "batch_size"),
        ({"levels": []}, "levels is empty"),
        ({"levels": ["nope"]}, "unknown label level"),
        ({"query_emb": ARC[:1], "query_labels": np.zeros((1, 1), np.int64)}, "at least 2 items"),
        ({"query_emb": ARC[:0], "query_labels": np.zeros((0, 1), np.int64)}, "query_emb is empty"),
    ],
)
def test_bad_input_is_reported_clearly(kwargs, message):
    arguments = {"query_emb": ARC, "query_labels": np.zeros((4, 1), dtype=np.int64), **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(**arguments)


# --- exclude_self: the asymmetric leave-one-out (student queries, teacher gallery of the same items) ---


def test_exclude_self_with_the_queries_as_gallery_is_leave_one_out_exactly():
    emb, labels = _grid_data(157, seed=3)  # many exact ties: the tie rule must agree too
    for asi in (False, True):
        leave_one_out = evaluate_embeddings(emb, labels, ks=(1, 5, 10), batch_size=32, asi=asi)
        paired = evaluate_embeddings(emb, labels, emb.copy(), labels, ks=(1, 5, 10), batch_size=32, asi=asi,
                                     exclude_self=True)  # fmt: skip
        assert paired == leave_one_out
        omitted = evaluate_embeddings(emb, labels, emb, ks=(1, 5, 10), batch_size=7, asi=asi, exclude_self=True)
        assert omitted == leave_one_out  # gallery_labels default to the query labels; chunking changes nothing


def test_exclude_self_hand_worked_asymmetric_case():
    # Student queries = ARC; teacher gallery = the same four items embedded elsewhere (unit vectors):
    teacher = np.array([[0.96, 0.28], [0.8, 0.6], [0.0, 1.0], [0.28, 0.96]], dtype=np.float32)
    labels = np.array([[0, 0], [1, 0], [0, 0], [1, 0]], dtype=np.int64)  # fine, coarse
    # Query i against the teacher gallery without item i (fine relevance in brackets):
    #   q0: t1 .8 [0], t3 .28 [0], t2 0 [1]      -> first hit rank 3, AP = 1/3
    #   q1: t0 .936 [0], t3 .8 [1], t2 .6 [0]    -> first hit rank 2, AP = 1/2
    #   q2: t1 .96 [0], t3 .936 [0], t0 .8 [1]  -> first hit rank 3, AP = 1/3
    #   q3: t2 1.0 [0], t1 .6 [1], t0 .28 [0]   -> first hit rank 2, AP = 1/2
    # Without the exclusion q0 and q1 would find their own teacher embedding first (.96 and 1.0).
    report = evaluate_embeddings(ARC, labels, teacher, labels, schema=("fine", "coarse"), ks=(1, 2, 3),
                                 exclude_self=True)  # fmt: skip
    assert report.per_level["fine"] == pytest.approx({"R@1": 0.0, "R@2": 0.5, "R@3": 1.0, "mAP": 5 / 12})
    assert report.per_level["coarse"] == pytest.approx({"R@1": 1.0, "R@2": 1.0, "R@3": 1.0, "mAP": 1.0})
    assert report.counted == {"fine": 4, "coarse": 4} and report.num_queries == 4
    plain = evaluate_embeddings(ARC, labels, teacher, labels, schema=("fine", "coarse"), ks=(1, 2, 3))
    assert plain.per_level["fine"]["R@1"] == 0.5  # q0 and q1 retrieve themselves


def test_exclude_self_matches_naive_loop_reference():
    rng = np.random.default_rng(11)
    student = rng.normal(size=(60, 8)).astype(np.float32)
    teacher = student + 0.5 * rng.normal(size=student.shape).astype(np.float32)
    student /= np.linalg.norm(student, axis=1, keepdims=True)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    fine = rng.integers(0, 15, size=60)
    labels = np.stack([fine, fine // 5], axis=1)
    ks = (1, 2, 4, 8)
    report = evaluate_embeddings(student, labels, teacher, labels, schema=("fine", "coarse"), ks=ks, batch_size=9,
                                 exclude_self=True)  # fmt: skip
    scores = student @ teacher.T
    for column, level in enumerate(("fine", "coarse")):
        expected = _naive_level_metrics(scores, labels[:, column], labels[:, column], ks, leave_one_out=True)
        assert report.per_level[level] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("gallery", "gallery_labels", "message"),
    [
        (None, None, "exclude_self needs gallery_emb"),
        (ARC[:3], None, "there are 4 queries and 3 gallery items"),
        (ARC, np.array([0, 1, 1, 1]), "gallery_labels differ from query_labels"),
    ],
)
def test_exclude_self_refuses_unpaired_sides(gallery, gallery_labels, message):
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(ARC, np.array([0, 1, 0, 1]), gallery, gallery_labels, exclude_self=True)
    with pytest.raises(ValueError, match="at least 2 items"):
        evaluate_embeddings(ARC[:1], [0], ARC[:1], [0], exclude_self=True)
