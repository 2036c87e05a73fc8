"""ASI (hand-worked and against a loop), the DyML protocol per level, and the saved-embeddings file."""

import math
import zipfile

import numpy as np
import pytest

from retrieval.evaluation import evaluate_embeddings
from retrieval.evaluation import protocols as protocols_module
from retrieval.evaluation.dyml import (
    DymlEmbeddingsError,
    DymlLevelEmbeddings,
    evaluate_dyml,
    load_dyml_embeddings,
    save_dyml_embeddings,
)
from retrieval.evaluation.metrics import average_search_index

# Four unit vectors on a quarter circle. Inner products:
#   e0.e1 = 0.8, e0.e2 = 0.6, e0.e3 = 0, e1.e2 = 0.96, e1.e3 = 0.6, e2.e3 = 0.8 (self = 1).
ARC = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)


def _naive_asi(row: np.ndarray) -> float:
    """ASI straight from its definition: (1/R) * sum_{n=1..R} |top-n ∩ relevant| / n."""
    num_relevant = int(row.sum())
    if num_relevant == 0:
        return math.nan
    return sum(row[:n].sum() / n for n in range(1, num_relevant + 1)) / num_relevant


@pytest.mark.parametrize(
    ("ranking", "expected"),
    [
        ([1, 0, 1], (1 / 1 + 1 / 2) / 2),  # R = 2: top-1 has 1, top-2 has 1 -> 0.75
        ([1, 1, 0, 0], 1.0),  # perfect ranking
        ([0, 0, 1, 1], 0.0),  # all positives last: none inside the top R = 2
        ([0, 1, 1, 0, 1], (0 / 1 + 1 / 2 + 2 / 3) / 3),  # R = 3 -> 0.388889
        ([1, 0, 1, 1], (1 / 1 + 1 / 2 + 2 / 3) / 3),  # R = 3 -> 0.722222
        ([0, 0, 0, 1], 0.0),  # R = 1: only the top-1 counts
        ([1, 1, 1, 1], 1.0),  # R = the whole ranking
    ],
)
def test_asi_hand_worked(ranking, expected):
    asi = average_search_index(np.array([ranking], dtype=bool))
    assert asi.dtype == np.float64 and asi.shape == (1,)
    assert asi[0] == pytest.approx(expected, abs=1e-15)


def test_asi_query_without_positive_is_nan_and_rows_are_independent():
    relevance = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=bool)
    asi = average_search_index(relevance)
    assert asi[0] == pytest.approx(0.75) and np.isnan(asi[1]) and asi[2] == 0.0
    empty = average_search_index(np.zeros((2, 0), dtype=bool))  # an empty ranking has no positive
    assert empty.shape == (2,) and np.isnan(empty).all()


def test_asi_matches_naive_loop_on_random_rankings():
    rng = np.random.default_rng(0)
    relevance = rng.random((200, 57)) < rng.random((200, 1))  # densities from 0 to 1, some empty rows
    asi = average_search_index(relevance)
    expected = np.array([_naive_asi(row) for row in relevance])
    np.testing.assert_allclose(asi, expected, rtol=0, atol=1e-12, equal_nan=True)
    # Rows never interact: any block of rows gives the same values (the protocol evaluates in chunks).
    np.testing.assert_array_equal(average_search_index(relevance[37:90]), asi[37:90])


def _grid_data(n: int, seed: int):
    # Small dyadic entries: inner products are exact in float32, with many exact ties.
    rng = np.random.default_rng(seed)
    emb = rng.integers(-2, 3, size=(n, 6)).astype(np.float32) / 4
    fine = rng.integers(0, max(n // 4, 1), size=n)
    return emb, np.stack([fine, fine // 3], axis=1)


def test_evaluate_embeddings_asi_column_and_chunking():
    emb, labels = _grid_data(101, seed=3)
    plain = evaluate_embeddings(emb, labels, schema=("fine", "coarse"), ks=(1, 5))
    with_asi = evaluate_embeddings(emb, labels, schema=("fine", "coarse"), ks=(1, 5), asi=True)
    assert plain.metric_names == ["R@1", "R@5", "mAP"]
    assert with_asi.metric_names == ["R@1", "R@5", "mAP", "ASI"]
    for level in ("fine", "coarse"):  # the other columns do not move
        assert {k: v for k, v in with_asi.per_level[level].items() if k != "ASI"} == plain.per_level[level]
    for batch_size in (1, 8, 100):
        kwargs = {"schema": ("fine", "coarse"), "ks": (1, 5), "asi": True, "batch_size": batch_size}
        assert evaluate_embeddings(emb, labels, **kwargs) == with_asi


def test_evaluate_embeddings_asi_matches_naive_reference():
    query, q_labels = _grid_data(40, seed=4)
    gallery, g_labels = _grid_data(60, seed=5)
    report = evaluate_embeddings(query, q_labels[:, 0], gallery, g_labels[:, 0], ks=(1,), asi=True, batch_size=7)
    scores = query @ gallery.T
    values = []
    for i in range(len(query)):
        order = sorted(range(len(gallery)), key=lambda j: (-scores[i, j], j))
        values.append(_naive_asi(g_labels[order, 0] == q_labels[i, 0]))
    assert report.per_level["fine"]["ASI"] == pytest.approx(np.nanmean(values), abs=1e-12)
    assert report.counted["fine"] == int(np.sum(~np.isnan(values)))


def _hand_levels() -> list[DymlLevelEmbeddings]:
    # fine: queries e0 (label 1), e3 (label 0) against gallery e0..e3 labelled [0, 1, 0, 2].
    #   e0 ranks e0 e1 e2 e3 -> relevance [0, 1, 0, 0]: R@1 0, AP 1/2, ASI 0 (R = 1, top-1 misses)
    #   e3 ranks e3 e2 e1 e0 -> relevance [0, 1, 0, 1]: R@1 0, AP (1/2 + 2/4)/2 = 1/2, ASI (0 + 1/2)/2 = 1/4
    fine = DymlLevelEmbeddings("fine", ARC[[0, 3]], np.array([1, 0]), ARC, np.array([0, 1, 0, 2]))
    # coarse, leave-one-out over e0..e3 labelled [0, 0, 1, 1]:
    #   e0: e1 e2 e3 -> [1, 0, 0] AP 1, ASI 1     e1: e2 e0 e3 -> [0, 1, 0] AP 1/2, ASI 0
    #   e2: e1 e3 e0 -> [0, 1, 0] AP 1/2, ASI 0   e3: e2 e1 e0 -> [1, 0, 0] AP 1, ASI 1
    coarse = DymlLevelEmbeddings("coarse", ARC, np.array([0, 0, 1, 1]))
    return [fine, coarse]


def test_evaluate_dyml_hand_worked_gallery_and_leave_one_out():
    report = evaluate_dyml(_hand_levels(), ks=(1, 10))
    assert report.levels == ["fine", "coarse"]
    assert report.metric_names == ["R@1", "R@10", "mAP", "ASI"]
    assert report.per_level["fine"] == pytest.approx({"R@1": 0.0, "R@10": 1.0, "mAP": 0.5, "ASI": 0.125})
    assert report.per_level["coarse"] == pytest.approx({"R@1": 0.5, "R@10": 1.0, "mAP": 0.75, "ASI": 0.5})
    assert report.mean == pytest.approx({"R@1": 0.25, "R@10": 1.0, "mAP": 0.625, "ASI": 0.3125})
    assert report.num_queries == 6 and report.counted == {"fine": 2, "coarse": 4}


def test_evaluate_dyml_default_ks_and_per_level_equivalence():
    levels = []
    for k, name in enumerate(("fine", "middle", "coarse")):
        query, q_labels = _grid_data(30 + k, seed=10 + k)
        gallery, g_labels = _grid_data(50, seed=20 + k)
        levels.append(DymlLevelEmbeddings(name, query, q_labels[:, 0], gallery, g_labels[:, 0]))
    report = evaluate_dyml(levels)
    assert report.metric_names == ["R@1", "R@10", "R@20", "mAP", "ASI"]
    for entry in levels:
        alone = evaluate_embeddings(
            entry.query, entry.query_labels, entry.gallery, entry.gallery_labels, ks=(1, 10, 20), asi=True
        )
        assert report.per_level[entry.level] == alone.per_level["fine"]
    assert report.mean["ASI"] == pytest.approx(np.mean([report.per_level[lv]["ASI"] for lv in report.levels]))
    assert report.num_queries == 30 + 31 + 32


def test_evaluate_dyml_chunked_equals_unchunked_and_bounds_memory(monkeypatch):
    query, q_labels = _grid_data(61, seed=6)
    gallery, g_labels = _grid_data(80, seed=7)
    levels = [
        DymlLevelEmbeddings("fine", query, q_labels[:, 0], gallery, g_labels[:, 0]),
        DymlLevelEmbeddings("coarse", query, q_labels[:, 1]),
    ]
    reference = evaluate_dyml(levels, batch_size=10_000)
    rows_seen = []
    ranker = protocols_module.rank_by_similarity

    def spy(scores, *args, **kwargs):
        rows_seen.append(scores.shape[0])
        return ranker(scores, *args, **kwargs)

    monkeypatch.setattr(protocols_module, "rank_by_similarity", spy)
    for batch_size in (1, 9, 60):
        rows_seen.clear()
        assert evaluate_dyml(levels, batch_size=batch_size) == reference
        assert max(rows_seen) == batch_size  # never more than batch_size x gallery scores at once


def test_evaluate_dyml_rejects_bad_levels():
    fine = _hand_levels()[0]
    with pytest.raises(ValueError, match="at least one level"):
        evaluate_dyml([])
    with pytest.raises(ValueError, match="repeated: fine"):
        evaluate_dyml([fine, fine])
    with pytest.raises(ValueError, match="ks"):
        evaluate_dyml([fine], ks=(1, 1))
    with pytest.raises(ValueError, match=r"level 'solo'.*at least 2"):
        evaluate_dyml([DymlLevelEmbeddings("solo", ARC[:1], np.array([0]))])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gallery": ARC[:, :1], "gallery_labels": np.arange(4)}, "dimension 2 but gallery has 1"),
        ({"gallery": ARC, "gallery_labels": np.arange(3)}, "gallery_labels has 3 entries but gallery has 4"),
        ({"query_labels": np.arange(3)}, "query_labels has 3 entries but query has 4"),
        ({"query_labels": np.zeros(4)}, "integer class ids"),
        ({"query_labels": np.zeros((4, 3), dtype=int)}, r"shape \(N,\)"),
        ({"query": ARC[0]}, r"shape \(Q, D\)"),
        ({"gallery": ARC}, "given together"),
        ({"level": "a/b"}, "level name"),
        ({"exclude_self": True}, "exclude_self needs a gallery of the same items"),
        ({"gallery": ARC[:3], "gallery_labels": np.arange(3), "exclude_self": True}, "same items as the queries"),
    ],
)
def test_level_embeddings_validate_shapes(kwargs, message):
    fields = {"level": "fine", "query": ARC, "query_labels": np.arange(4), **kwargs}
    with pytest.raises(ValueError, match=message):
        DymlLevelEmbeddings(**fields)


def test_npz_round_trip(tmp_path):
    levels = _hand_levels()
    path = save_dyml_embeddings(tmp_path / "emb", levels)
    assert path == tmp_path / "emb.npz" and path.is_file()
    loaded = load_dyml_embeddings(path)
    assert [entry.level for entry in loaded] == ["fine", "coarse"]
    fine, coarse = loaded
    np.testing.assert_array_equal(fine.query, ARC[[0, 3]])
    np.testing.assert_array_equal(fine.gallery_labels, [0, 1, 0, 2])
    assert fine.query.dtype == np.float32 and fine.query_labels.dtype == np.int64
    assert coarse.leave_one_out and coarse.gallery_labels is None
    assert evaluate_dyml(loaded) == evaluate_dyml(levels)
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == sorted(
            f"{key}.npy"
            for key in (
                "levels",
                "fine/query",
                "fine/query_labels",
                "fine/gallery",
                "fine/gallery_labels",
                "coarse/query",
                "coarse/query_labels",
            )
        )


def _arrays(**changes):
    fine = _hand_levels()[0]
    arrays = {
        "levels": np.array(["fine"]),
        "fine/query": fine.query,
        "fine/query_labels": fine.query_labels,
        "fine/gallery": fine.gallery,
        "fine/gallery_labels": fine.gallery_labels,
    }
    arrays.update(changes)
    return {key: value for key, value in arrays.items() if value is not None}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_arrays(levels=None), "missing the 'levels' array"),
        (_arrays(**{"fine/query_labels": None}), "level 'fine' has no fine/query_labels array"),
        (_arrays(levels=np.array(["fine", "coarse"])), "level 'coarse' has no coarse/query array"),
        (_arrays(**{"fine/gallery": np.zeros((4, 3), np.float32)}), "dimension 2 but gallery has 3"),
        (_arrays(**{"fine/gallery_labels": np.arange(5)}), "gallery_labels has 5 entries but gallery has 4"),
        (_arrays(**{"fine/gallery_labels": None}), "given together"),
        (_arrays(**{"fine/extra": np.zeros(2)}), "unexpected arrays fine/extra"),
        (_arrays(levels=np.array(["fine", "fine"])), "level names repeat"),
        (_arrays(levels=np.array([1, 2])), "non-empty 1-D array of level names"),
        (_arrays(**{"fine/query_labels": np.array([1, 0], dtype=object)}), "without unpickling"),
        (_arrays(**{"fine/exclude_self": np.array([1, 0])}), "'fine/exclude_self' must be a single boolean"),
    ],
)
def test_npz_load_errors_name_file_and_array(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DymlEmbeddingsError, match=message) as caught:
        load_dyml_embeddings(path)
    assert isinstance(caught.value, ValueError) and str(path) in str(caught.value)


def test_npz_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dyml_embeddings(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(DymlEmbeddingsError, match="not a DyML embeddings"):
        load_dyml_embeddings(tmp_path / "text.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DymlEmbeddingsError, match="single array"):
        load_dyml_embeddings(tmp_path / "single.npy")
    with pytest.raises(ValueError, match="unique"):
        save_dyml_embeddings(tmp_path / "x.npz", [_hand_levels()[0]] * 2)


def test_exclude_self_level_is_asymmetric_leave_one_out_and_round_trips(tmp_path):
    rng = np.random.default_rng(4)
    student = rng.normal(size=(24, 6)).astype(np.float32)
    teacher = student + 0.5 * rng.normal(size=student.shape).astype(np.float32)
    student /= np.linalg.norm(student, axis=1, keepdims=True)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    labels = rng.integers(0, 5, size=24)
    level = DymlLevelEmbeddings("coarse", student, labels, teacher, labels, exclude_self=True)
    assert level.leave_one_out
    report = evaluate_dyml([level], ks=(1, 5))
    expected = evaluate_embeddings(student, labels, teacher, labels, schema=("coarse",), ks=(1, 5), asi=True,
                                   exclude_self=True)  # fmt: skip
    assert report.per_level == expected.per_level
    same = DymlLevelEmbeddings("coarse", teacher, labels, teacher, labels, exclude_self=True)
    assert evaluate_dyml([same]) == evaluate_dyml([DymlLevelEmbeddings("coarse", teacher, labels)])

    path = save_dyml_embeddings(tmp_path / "asym.npz", [*_hand_levels()[:1], level])
    loaded = load_dyml_embeddings(path)
    assert [entry.exclude_self for entry in loaded] == [False, True]
    assert evaluate_dyml(loaded, ks=(1, 5)).per_level["coarse"] == report.per_level["coarse"]
