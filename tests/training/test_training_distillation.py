"""Distillation (AML) through the one training loop: mining rule, teacher cache, resume, and it learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_synthetic import TINY_DATA, tiny_splits

from models.checkpoint import load_encoder
from retrieval.config import ConfigError
from training.config import DistillConfig, TrainConfig
from training.mining import AsymmetricTupleMiner
from training.objectives.distillation import DistillationObjective
from training.teacher_cache import TeacherCacheError
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data():
    return tiny_splits()


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    """A tiny teacher trained for a few steps by the metric objective (its space has some structure)."""
    train, _ = tiny_data
    config = TrainConfig.model_validate(
        {
            "data": {"synthetic": TINY_DATA.model_dump()},
            "model": {"backbone": "resnet10t", "embedding_dim": 32, "preprocess": {"input_size": 32}},
            "sampler": {"classes_per_batch": 8, "images_per_class": 4},
            "optim": {"lr": 3e-3},
            "schedule": {"max_steps": 100, "warmup_steps": 5},
            "checkpoint_every": 0,
            "device": "cpu",
            "seed": 1,
        }
    )
    out = tmp_path_factory.mktemp("teacher")
    return Trainer(config, train, None, out_dir=out, progress=False).fit().encoder_path


def _distill_config(teacher, **overrides) -> DistillConfig:
    base = {
        "name": "tiny-distill",
        "data": {"synthetic": TINY_DATA.model_dump()},
        "model": {
            "backbone": "resnet10t",
            "embedding_dim": 8,  # replaced by the teacher's 32
            "preprocess": {"input_size": 32},
        },
        # the teacher's cache holds un-augmented images; no augmentation makes 40 steps enough to learn
        "augment": {"scale_min": 1.0, "hflip": False, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
        "distill": {"teacher": str(teacher), "pool_size": None},
        "loss": {"name": "aml_regression"},
        "sampler": {"classes_per_batch": 8, "images_per_class": 4},
        "optim": {"lr": 5e-3, "weight_decay": 0.0},
        "schedule": {"max_steps": 40, "warmup_steps": 2},
        "log_every": 5,
        "checkpoint_every": 0,
        "device": "cpu",
        "seed": 5,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            base.setdefault(section, {})[field] = value
        else:
            base[key] = value
    return DistillConfig.model_validate(base)


def test_distillation_beats_the_untrained_student_asymmetrically(tiny_data, teacher, tmp_path):
    train, val = tiny_data
    trainer = Trainer(_distill_config(teacher), train, val, out_dir=tmp_path, progress=False)
    objective = trainer.objective
    assert isinstance(objective, DistillationObjective)
    teacher_before = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    untrained = trainer.evaluate().mean["mAP"]
    result = trainer.fit()
    trained = result.val_report.mean["mAP"]
    assert trained > untrained + 0.04, (untrained, trained)
    assert trained > 0.8 * objective.last_reports["teacher"].mean["mAP"]
    # the teacher is frozen and stays in eval mode
    assert all(torch.equal(teacher_before[k], v) for k, v in objective.teacher.state_dict().items())
    assert not objective.teacher.training
    # the student records its teacher and has the teacher's dimension
    student = load_encoder(result.encoder_path)
    teacher_encoder = load_encoder(teacher)
    assert student.config.teacher_id == teacher_encoder.encoder_id
    assert student.embedding_dim == teacher_encoder.embedding_dim == 32
    assert student.config.provenance["teacher_id"] == teacher_encoder.encoder_id
    assert set(objective.last_reports) == {"symmetric", "asymmetric", "teacher"}


def test_tuple_loss_distillation_resumes_bit_exactly(tiny_data, teacher, tmp_path):
    train, _ = tiny_data
    config = _distill_config(
        teacher, loss={"name": "aml_contrastive_plus"}, schedule={"max_steps": 6, "warmup_steps": 1}
    )
    config = config.model_copy(update={"distill": config.distill.model_copy(update={"pool_size": 100})})
    straight = Trainer(config, train, None, out_dir=tmp_path / "a", progress=False)
    straight.fit()
    first = Trainer(config, train, None, out_dir=tmp_path / "b", progress=False)
    first.fit(stop_at_step=3)
    resumed = Trainer(config, train, None, out_dir=tmp_path / "b", progress=False)
    resumed.fit()
    a, b = straight.encoder.state_dict(), resumed.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the second and third runs found the first run's teacher cache instead of recomputing it
    entries = list((tmp_path / "b" / "teacher-cache").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith(load_encoder(teacher).encoder_id)


def test_resume_with_another_teacher_is_refused(tiny_data, teacher, make_checkpoint, tmp_path):
    train, _ = tiny_data
    config = _distill_config(teacher, schedule={"max_steps": 4, "warmup_steps": 1})
    Trainer(config, train, None, out_dir=tmp_path, progress=False).fit(stop_at_step=2)
    other = make_checkpoint(11)
    other_config = config.model_copy(update={"distill": config.distill.model_copy(update={"teacher": other})})
    with pytest.raises(ValueError, match=r"distilled from teacher .* but the run's teacher is"):
        Trainer(other_config, train, None, out_dir=tmp_path, progress=False).fit()


def test_another_teachers_cache_is_refused_with_both_ids(tiny_data, teacher, make_checkpoint, tmp_path):
    train, _ = tiny_data
    first = Trainer(_distill_config(teacher), train, None, out_dir=tmp_path / "a", progress=False)
    entry = first.objective.cache.path
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["count"] == len(train) and meta["dim"] == 32
    np.testing.assert_allclose(np.linalg.norm(first.objective.cache.embeddings, axis=1), 1.0, atol=1e-5)

    other = make_checkpoint(12)
    other_id = load_encoder(other).encoder_id
    config = _distill_config(other, distill={"teacher": str(other), "teacher_embeddings": str(entry)})
    with pytest.raises(TeacherCacheError) as caught:
        Trainer(config, train, None, out_dir=tmp_path / "b", progress=False)
    assert meta["teacher_id"] in str(caught.value) and other_id in str(caught.value)

    # the same teacher's cache of other data is refused too
    fewer = train.subset(np.arange(len(train) - 4))
    config = _distill_config(teacher, distill={"teacher": str(teacher), "teacher_embeddings": str(entry)})
    with pytest.raises(TeacherCacheError, match="other training data"):
        Trainer(config, fewer, None, out_dir=tmp_path / "c", progress=False)


def test_losses_and_objectives_must_match(tiny_data, teacher, tmp_path):
    train, _ = tiny_data
    with pytest.raises(ConfigError, match="not a distillation loss"):
        Trainer(_distill_config(teacher, loss={"name": "multiscale_normsoftmax"}), train, None, out_dir=tmp_path)
    metric = TrainConfig.model_validate({"loss": {"name": "aml_regression"}, "device": "cpu"})
    with pytest.raises(ConfigError, match="retrieval distill"):
        Trainer(metric, train, None, out_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"distill\.teacher is required"):
        Trainer(_distill_config(teacher, distill={"teacher": None}), train, None, out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- mining


def _brute_force_negatives(query, own_cluster, pool, pool_vectors, clusters, k):
    """The mining rule written out: rank by similarity, skip own cluster, one per cluster, k hardest."""
    scores = pool_vectors @ query
    chosen, seen = [], set()
    for column in sorted(range(len(pool)), key=lambda c: (-scores[c], c)):
        cluster = clusters[pool[column]]
        if cluster == own_cluster or cluster in seen:
            continue
        seen.add(cluster)
        chosen.append(int(pool[column]))
        if len(chosen) == k:
            break
    return chosen + [-1] * (k - len(chosen))


@pytest.mark.parametrize("pool_size", [None, 40])
def test_miner_follows_the_cluster_rule(pool_size):
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 12, size=90)
    teacher = rng.standard_normal((90, 16)).astype(np.float32)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    miner = AsymmetricTupleMiner(clusters, num_negatives=5, pool_size=pool_size, seed=3)
    pool = miner.pool(epoch=2)
    assert len(pool) == (90 if pool_size is None else 40) and np.all(np.diff(pool) > 0)
    assert np.array_equal(miner.pool(epoch=2), pool)
    if pool_size is not None:
        assert not np.array_equal(miner.pool(epoch=3), pool)  # refreshed each epoch
        pool = miner.pool(epoch=2)
    queries_at = np.array([0, 5, 17, 33, 60])
    student = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    mined = miner.mine(student, queries_at, torch.from_numpy(teacher[pool]), epoch=2, step=9)
    for row, query in enumerate(queries_at):
        expected = _brute_force_negatives(student[row].numpy(), clusters[query], pool, teacher[pool], clusters, k=5)
        assert mined.negatives[row].tolist() == expected
        negatives = mined.negatives[row][mined.negatives[row] >= 0]
        assert clusters[query] not in clusters[negatives]
        assert len(set(clusters[negatives].tolist())) == len(negatives)
        positive = mined.positives[row]
        if (clusters == clusters[query]).sum() > 1:
            assert positive != query and clusters[positive] == clusters[query]
        else:
            assert positive == -1
    again = miner.mine(student, queries_at, torch.from_numpy(teacher[pool]), epoch=2, step=9)
    assert np.array_equal(again.positives, mined.positives)  # a pure function of the step


def test_miner_prefers_official_positives():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    miner = AsymmetricTupleMiner(clusters, num_negatives=2, positives={0: [2]}, seed=0)
    vectors = torch.eye(6)
    for step in range(5):
        mined = miner.mine(vectors[[0, 3]], np.array([0, 3]), vectors, epoch=0, step=step)
        assert mined.positives.tolist() == [2, 4]
        assert mined.negatives[1].tolist()[:1] in ([0], [1], [2], [5])
