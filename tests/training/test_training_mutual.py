"""DM² mutual learning: the relation loss, the three diversities, the cohort run's outputs and its resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_synthetic import TINY_DATA, tiny_splits

from models.checkpoint import load_encoder
from models.ensemble import EnsembleEncoder
from retrieval.config import ConfigError
from retrieval.data.transforms import AugmentConfig, PreprocessConfig, build_transforms
from training.batches import MultiView, SeededSamples
from training.config import TrainConfig
from training.objectives.base import Batch
from training.objectives.mutual import (
    MutualLearningObjective,
    relation_loss,
    relation_matrix,
    update_probability,
)
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data():
    return tiny_splits()


def _config(mutual: dict | None = None, **overrides) -> TrainConfig:
    base = {
        "name": "tiny-cohort",
        "data": {"synthetic": TINY_DATA.model_dump()},
        "model": {"backbone": "resnet10t", "embedding_dim": 16, "preprocess": {"input_size": 32}},
        "loss": {"name": "multiscale_normsoftmax", "params": {"scale": 16.0}},
        "mutual": {"size": 2, **(mutual or {})},
        "sampler": {"classes_per_batch": 8, "images_per_class": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"max_steps": 6, "warmup_steps": 1},
        "log_every": 2,
        "checkpoint_every": 0,
        "device": "cpu",
        "seed": 5,
        **overrides,
    }
    return TrainConfig.model_validate(base)


# ---------------------------------------------------------------------------------------------- relation loss


def test_relation_matrix_is_the_euclidean_distance_matrix_with_finite_gradients():
    torch.manual_seed(0)
    vectors = F.normalize(torch.randn(7, 5), dim=1).requires_grad_()
    matrix = relation_matrix(vectors)
    expected = torch.cdist(vectors.detach(), vectors.detach())
    expected.fill_diagonal_(0)
    assert torch.allclose(matrix, expected, atol=1e-5)
    assert torch.equal(matrix.diagonal(), torch.zeros(7))
    matrix.sum().backward()
    assert torch.isfinite(vectors.grad).all()


def test_relation_loss_matches_a_naive_loop_and_ignores_the_partners_gradients():
    torch.manual_seed(1)
    models = [F.normalize(torch.randn(6, 4), dim=1).requires_grad_() for _ in range(3)]
    plain = [m.detach() for m in models]
    relations = [relation_matrix(m) for m in models]
    loss = relation_loss(relations[0], relations[1:])

    naive = 0.0
    for partner in (1, 2):
        total = 0.0
        for i in range(6):
            for j in range(6):
                own = float(torch.dist(plain[0][i], plain[0][j])) if i != j else 0.0
                other = float(torch.dist(plain[partner][i], plain[partner][j])) if i != j else 0.0
                total += (own - other) ** 2
        naive += total / 36
    assert float(loss.detach()) == pytest.approx(naive / 2, rel=1e-5)

    loss.backward()
    assert models[0].grad is not None and models[0].grad.abs().sum() > 0
    assert models[1].grad is None and models[2].grad is None  # partners are targets, not learners


def test_relation_loss_is_zero_between_identical_models_and_needs_a_partner():
    vectors = F.normalize(torch.randn(5, 3), dim=1)
    assert float(relation_loss(relation_matrix(vectors), [relation_matrix(vectors.clone())])) == 0.0
    with pytest.raises(ValueError, match="partner"):
        relation_loss(relation_matrix(vectors), [])


# ---------------------------------------------------------------------------------------------- diversities


def test_temporal_diversity_updates_model_l_with_probability_two_to_the_minus_l(tiny_data):
    objective = MutualLearningObjective(_config({"size": 4}), tiny_data[0])
    steps = 4000
    counts = np.sum([objective.updating(step) for step in range(steps)], axis=0) / steps
    assert counts[0] == 1.0
    for index in (1, 2, 3):
        # binomial standard error at most 0.008 for 4000 draws: 4 standard errors of room
        assert abs(counts[index] - update_probability(index)) < 0.032, (index, counts)
    assert objective.updating(17) == objective.updating(17)  # a function of the step: a resume repeats it
    assert (
        MutualLearningObjective(_config({"size": 4, "temporal_diversity": False}), tiny_data[0]).updating(3)
        == [True] * 4
    )


def test_relation_weight_warms_up_linearly_over_the_first_epochs(tiny_data):
    objective = MutualLearningObjective(_config({"weight": 20.0, "warmup_epochs": 3}), tiny_data[0])
    assert objective.relation_weight(0.0) == 0.0
    assert objective.relation_weight(1.5) == pytest.approx(10.0)
    assert objective.relation_weight(3.0) == objective.relation_weight(7.0) == 20.0
    flat = MutualLearningObjective(_config({"warmup_epochs": 0}), tiny_data[0])
    assert flat.relation_weight(0.0) == 20.0


def test_model_diversity_decides_whether_the_models_start_alike(tiny_data):
    diverse = MutualLearningObjective(_config({"model_diversity": True}), tiny_data[0])
    alike = MutualLearningObjective(_config({"model_diversity": False}), tiny_data[0])
    first, second = (dict(m.named_parameters()) for m in diverse.models)
    assert not torch.equal(first["head.proj.weight"], second["head.proj.weight"])
    first, second = (dict(m.named_parameters()) for m in alike.models)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_multiview_draws_one_augmentation_per_model_the_first_being_the_plain_one(tiny_data):
    transform = build_transforms(PreprocessConfig(input_size=32), train=True, augment=AugmentConfig())
    plain = SeededSamples(tiny_data[0].with_transform(transform))[(3, 1234)][0]
    views = SeededSamples(tiny_data[0].with_transform(MultiView(transform, 3)))[(3, 1234)][0]
    again = SeededSamples(tiny_data[0].with_transform(MultiView(transform, 3)))[(3, 1234)][0]
    assert views.shape == (3, *plain.shape)
    assert torch.equal(views[0], plain) and torch.equal(views, again)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


def test_a_model_that_skips_a_step_keeps_its_weights_while_the_first_moves(tiny_data):
    objective = MutualLearningObjective(_config({"size": 3}), tiny_data[0])
    step = next(s for s in range(100) if objective.updating(s) == [True, False, False])
    images = torch.randn(8, 3, 32, 32)
    labels = torch.from_numpy(tiny_data[0].labels[:8].copy())
    objective.train()
    batch = Batch(images=images, labels=labels, indices=torch.arange(8), step=step, epochs_done=5.0)
    objective.loss(batch).backward()
    grads = [[p.grad for p in model.parameters()] for model in objective.models]
    assert any(g is not None and g.abs().sum() > 0 for g in grads[0])
    assert all(g is None for g in grads[1] + grads[2])  # AdamW skips parameters without a gradient


# ---------------------------------------------------------------------------------------------- the run


def test_a_cohort_run_saves_every_model_and_the_ensemble_of_them(tiny_data, tmp_path):
    train, val = tiny_data
    trainer = Trainer(_config(), train, val, out_dir=tmp_path, progress=False)
    result = trainer.fit()

    assert result.steps == 6 and result.val_report is not None
    ensemble = load_encoder(result.encoder_path)
    members = [load_encoder(tmp_path / "members" / str(i)) for i in range(2)]
    assert isinstance(ensemble, EnsembleEncoder) and ensemble.embedding_dim == 32
    assert [m.embedding_dim for m in members] == [16, 16]
    assert members[1].config.provenance["output"] == "members/1"
    assert ensemble.config.provenance["mutual"]["size"] == 2
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = F.normalize(torch.cat([m(images) for m in members], dim=1), dim=1)
        assert torch.allclose(ensemble(images), expected, atol=1e-5)
    assert set(trainer.objective.last_reports) == {"model0", "model1", "ensemble"}
    written = (tmp_path / "config.yaml").read_text()
    assert "objective: mutual" in written and "ensemble" not in written  # re-runnable: the base model is kept


def test_a_cohort_run_resumes_bit_exactly_with_every_diversity_on(tiny_data, tmp_path):
    train, _ = tiny_data
    config = _config({"size": 3, "warmup_epochs": 0.5}, checkpoint_every=3)
    straight = Trainer(config, train, None, out_dir=tmp_path / "straight", progress=False)
    straight.fit()
    Trainer(config, train, None, out_dir=tmp_path / "sliced", progress=False).fit(stop_at_step=3)
    resumed = Trainer(config, train, None, out_dir=tmp_path / "sliced", progress=False)
    resumed.fit()
    for a, b in zip(straight.encoder.state_dict().values(), resumed.encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.objective.losses, resumed.objective.losses, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_cohort_members_may_differ_in_architecture_and_loss(tiny_data):
    config = _config(
        {
            "members": [
                {},
                {
                    "model": {"backbone": "resnet18", "embedding_dim": 8},
                    "loss": {"name": "multiscale_cosface", "params": {}},
                },
            ]
        }
    )
    objective = MutualLearningObjective(config, tiny_data[0])
    assert [m.config.backbone for m in objective.models] == ["resnet10t", "resnet18"]
    assert objective.ensemble.embedding_dim == 24
    assert objective.loss_names == ["multiscale_normsoftmax", "multiscale_cosface"]


# ---------------------------------------------------------------------------------------------- config


def test_a_mutual_section_selects_the_mutual_objective_and_bad_sections_are_refused():
    assert _config().objective == "mutual"
    assert TrainConfig.model_validate({"objective": "mutual"}).mutual is not None
    with pytest.raises(ValueError, match="preprocess"):
        _config({"members": [{}, {"model": {"preprocess": {"input_size": 64}}}]})
    with pytest.raises(ValueError, match="at least two"):
        _config({"members": [{}]})
    with pytest.raises(ValueError, match="view_diversity"):
        _config(sampler={"kind": "aspect", "batch_size": 8})
    with pytest.raises(ValueError, match="mutual"):
        TrainConfig.model_validate({"objective": "distillation", "mutual": {}})


def test_a_member_override_that_does_not_validate_names_the_member(tiny_data):
    with pytest.raises(ConfigError, match=r"mutual.members\[1\].model"):
        MutualLearningObjective(_config({"members": [{}, {"model": {"embedding_dim": -3}}]}), tiny_data[0])


def test_a_set_override_creates_an_unset_optional_section():
    from retrieval.config import ConfigError, load_config
    from training.recipe_paths import recipe_path

    config = load_config(TrainConfig, recipe_path("quickstart"), ["mutual.size=3", "mixup.kind=input"])
    assert config.objective == "mutual" and config.mutual.cohort_size == 3 and config.mixup.kind == "input"
    with pytest.raises(ConfigError, match="not a section"):
        load_config(TrainConfig, recipe_path("quickstart"), ["seed.value=3"])
