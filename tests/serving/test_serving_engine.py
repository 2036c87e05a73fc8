"""SearchEngine: pairs a query encoder with the index it may search, refuses any other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexing import NotCalibratedError, UnknownGranularityError, open_index_dir
from models import Encoder, read_checkpoint_info, save_encoder
from retrieval.data.datasets import CsvImageDataset
from retrieval.errors import UserFacingError
from serving.engine import EncoderMismatchError, SearchEngine
from serving.runtimes import QueryEncoderError, open_query_encoder


def test_gallery_images_find_themselves_first(serving_index, serving_gallery):
    gallery = CsvImageDataset(serving_gallery)
    with SearchEngine.open(serving_index) as engine:  # query encoder = the manifest's encoder_path
        assert engine.count == len(gallery)
        assert engine.encoder_id == read_checkpoint_info(engine.index_dir.manifest.encoder_path).encoder_id
        images = [gallery.load_image(i) for i in range(len(gallery))]
        results = engine.search(images, k=4)
    assert len(results) == len(gallery)
    for i, hits in enumerate(results):
        assert len(hits) == 4
        assert hits[0].id == i and hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].labels == gallery.label_names(i)
        assert hits[0].path == gallery.names[i]
        assert hits.scores == sorted(hits.scores, reverse=True)


def test_onnx_query_encoder_gives_the_same_ranking(serving_index, serving_onnx, serving_gallery):
    gallery = CsvImageDataset(serving_gallery)
    images = [gallery.load_image(i) for i in range(3)]
    with (
        SearchEngine.open(serving_index) as torch_engine,
        SearchEngine.open(serving_index, serving_onnx) as onnx_engine,
    ):
        a = torch_engine.search(images, k=5)
        b = onnx_engine.search(images, k=5)
    assert [r.ids for r in a] == [r.ids for r in b]
    np.testing.assert_allclose([r.scores for r in a], [r.scores for r in b], atol=1e-4)


def test_k_larger_than_the_index_returns_everything_and_bad_k_is_refused(serving_index, serving_gallery):
    gallery = CsvImageDataset(serving_gallery)
    with SearchEngine.open(serving_index) as engine:
        (hits,) = engine.search([gallery.load_image(0)], k=100)
        assert len(hits) == len(gallery)
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="k must be a positive integer"):
                engine.search([gallery.load_image(0)], k=bad)
        assert engine.search([], k=3) == []


def test_engine_refuses_an_encoder_from_another_space(serving_index, other_checkpoint):
    index_dir = open_index_dir(serving_index)
    try:
        stranger = open_query_encoder(other_checkpoint)
        with pytest.raises(EncoderMismatchError) as err:
            SearchEngine(index_dir, stranger)
        message = str(err.value)
        assert stranger.encoder_id in message and index_dir.manifest.encoder_id in message
    finally:
        index_dir.close()
    with pytest.raises(EncoderMismatchError):
        SearchEngine.open(serving_index, other_checkpoint)


def test_engine_accepts_a_student_of_the_index_encoder(serving_index, tiny_encoder_config, tmp_path):
    teacher_id = open_index_dir(serving_index).manifest.encoder_id
    torch.manual_seed(5)
    student = Encoder(tiny_encoder_config.model_copy(update={"teacher_id": teacher_id}))
    student_id = save_encoder(student, tmp_path / "student")
    assert student_id != teacher_id
    with SearchEngine.open(serving_index, tmp_path / "student") as engine:
        assert engine.query_encoder.teacher_id == teacher_id


def test_engine_refuses_a_student_with_the_wrong_dimension(serving_index, tiny_encoder_config, tmp_path):
    teacher_id = open_index_dir(serving_index).manifest.encoder_id
    config = tiny_encoder_config.model_copy(update={"teacher_id": teacher_id, "embedding_dim": 16})
    save_encoder(Encoder(config), tmp_path / "student16")
    with pytest.raises(EncoderMismatchError, match=r"16-d embeddings .* 32-d vectors"):
        SearchEngine.open(serving_index, tmp_path / "student16")


def test_missing_query_encoder_is_a_clear_error(serving_index, tmp_path):
    with pytest.raises(QueryEncoderError, match="not found"):
        SearchEngine.open(serving_index, tmp_path / "nothing-here")


def test_search_at_a_granularity_keeps_hits_above_the_threshold_and_tags_levels(calibrated_index, serving_gallery):
    from indexing.granularity import finest_level

    gallery = CsvImageDataset(serving_gallery)
    images = [gallery.load_image(i) for i in range(len(gallery))]
    with SearchEngine.open(calibrated_index) as engine:
        thresholds = engine.thresholds
        assert list(thresholds) == ["fine", "middle", "coarse"]
        everything = engine.search(images, k=len(gallery))
        by_level = {level: engine.search(images, k=4, granularity=level) for level in thresholds}
        with pytest.raises(UnknownGranularityError, match="unknown granularity 'tiny'"):
            engine.search(images, k=4, granularity="tiny")
    for q, ranking in enumerate(everything):
        assert [hit.level for hit in ranking] == [finest_level(hit.score, thresholds) for hit in ranking]
        assert ranking[0].level == "fine"  # the image itself, score 1
        for level, results in by_level.items():
            kept = results[q]
            assert kept.ids == [h.id for h in ranking if h.score >= thresholds[level]][:4]
            assert all(hit.score >= thresholds[level] and hit.level is not None for hit in kept)


def test_granularity_on_an_uncalibrated_index_is_a_clear_error(serving_index, serving_gallery):
    gallery = CsvImageDataset(serving_gallery)
    with SearchEngine.open(serving_index) as engine:
        assert engine.thresholds == {}
        (plain,) = engine.search([gallery.load_image(0)], k=3)
        assert all(hit.level is None for hit in plain)
        with pytest.raises(NotCalibratedError, match="retrieval index calibrate") as err:
            engine.search([gallery.load_image(0)], k=3, granularity="fine")
    assert isinstance(err.value, UserFacingError)


def test_search_embeddings_matches_search_and_vectors_are_validated(serving_index, serving_gallery):
    from serving.engine import ForeignEmbeddingError, QueryVectorError

    gallery = CsvImageDataset(serving_gallery)
    images = [gallery.load_image(i) for i in range(3)]
    with SearchEngine.open(serving_index) as engine:
        vectors = engine.embed(images)
        assert vectors.shape == (3, 32) and vectors.dtype == np.float32
        by_image, by_vector = engine.search(images, k=4), engine.search_embeddings(vectors, k=4)
        assert [r.ids for r in by_image] == [r.ids for r in by_vector]
        assert engine.accepted_encoder_ids == [engine.encoder_id]
        checked = engine.check_query_vectors(vectors[0].tolist(), engine.encoder_id)
        assert checked.shape == (1, 32) and checked.dtype == np.float32
        with pytest.raises(ForeignEmbeddingError, match="abc"):
            engine.check_query_vectors(vectors[0], "abc")
        # a student the server does not serve is accepted by its teacher id, a student of another teacher is not
        assert engine.check_query_vectors(vectors[0], "student-id", teacher_id=engine.encoder_id).shape == (1, 32)
        with pytest.raises(ForeignEmbeddingError, match="other-teacher"):
            engine.check_query_vectors(vectors[0], "student-id", teacher_id="other-teacher")
        for bad, message in [
            (vectors[0, :16], "16 dimensions"),
            (np.full(32, np.inf), "non-finite"),
            (vectors[0] * 1.5, "L2-normalised"),
            (np.zeros(32), "L2-normalised"),
        ]:
            with pytest.raises(QueryVectorError, match=message):
                engine.check_query_vectors(bad, engine.encoder_id)
        engine.warm_up()
        description = engine.describe()
        assert str(serving_index) not in str(description) and description["count"] == len(gallery)


def test_granularity_errors_name_no_server_path(serving_index, calibrated_index):
    with SearchEngine.open(serving_index) as engine, pytest.raises(NotCalibratedError) as err:
        engine.granularity_threshold("fine")
    assert str(serving_index) not in str(err.value) and "retrieval index calibrate" in str(err.value)
    with SearchEngine.open(calibrated_index) as engine:
        with pytest.raises(UnknownGranularityError) as err:
            engine.search_embeddings(np.eye(1, 32, dtype=np.float32), 3, granularity="tiny")
        assert engine.granularity_threshold("fine") == engine.thresholds["fine"]
    assert str(calibrated_index) not in str(err.value) and "fine, middle, coarse" in str(err.value)
