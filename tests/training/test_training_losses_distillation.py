"""AML distillation losses against naive per-anchor loops, pytorch-metric-learning, and their input contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from training.losses import create_loss, is_distillation_loss
from training.losses.distillation import AsymmetricContrastiveLoss, DistillationLoss

B, POOL, DIM = 8, 24, 16
NUM_NEGATIVES = 5
NAMES = [
    "aml_contrastive",
    "aml_contrastive_plus",
    "aml_regression",
    "aml_triplet",
    "aml_multisimilarity",
    "rkd",
    "darkrank",
]
TUPLE_NAMES = ["aml_contrastive", "aml_contrastive_plus", "aml_triplet", "aml_multisimilarity"]
VALUE_TOL = {"rtol": 1e-10, "atol": 1e-12}
GRAD_TOL = {"rtol": 1e-8, "atol": 1e-10}


def _unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Student anchors, teacher rows (anchors' own first, then a pool) and a miner-like pair tuple.

    Each anchor gets 1 positive and 5 negatives, distinct rows of the pool (rows B..); pools overlap
    between anchors as a shared mining pool does.
    """
    gen = torch.Generator().manual_seed(seed)
    student = _unit(B, DIM, gen=gen).requires_grad_(True)
    own = F.normalize(student.detach() + 0.5 * torch.randn(B, DIM, generator=gen, dtype=torch.float64), dim=1)
    teacher = torch.cat([own, _unit(POOL, DIM, gen=gen)])
    a1, p, a2, n = [], [], [], []
    for i in range(B):
        rows = (B + torch.randperm(POOL, generator=gen)[: 1 + NUM_NEGATIVES]).tolist()
        a1.append(i)
        p.append(rows[0])
        a2 += [i] * NUM_NEGATIVES
        n += rows[1:]
    pairs = tuple(torch.tensor(v, dtype=torch.int64) for v in (a1, p, a2, n))
    return student, teacher, pairs


def _dist_from_sim(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(2 - 2 * torch.dot(f, g), min=1e-12))


def _euclidean(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((u - v) ** 2).sum())


def _smooth_l1(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x**2 if abs(float(x.detach())) < 1 else x.abs() - 0.5


def _positives(pairs, i):
    a1, p, _, _ = pairs
    return [int(p[j]) for j in range(len(a1)) if int(a1[j]) == i]


def _negatives(pairs, i):
    _, _, a2, n = pairs
    return [int(n[j]) for j in range(len(a2)) if int(a2[j]) == i]


def _contrastive_reference(f, g, pairs, margin=0.7, include_self=False):
    total = f.new_zeros(())
    for i in range(len(f)):
        for r in _positives(pairs, i):
            total = total + 0.5 * torch.clamp(2 - 2 * torch.dot(f[i], g[r]), min=0)
        for r in _negatives(pairs, i):
            total = total + 0.5 * torch.clamp(margin - _dist_from_sim(f[i], g[r]), min=0) ** 2
        if include_self:
            total = total + 0.5 * torch.clamp(2 - 2 * torch.dot(f[i], g[i]), min=0)
    return total / len(f)


def _cirtorch_contrastive_reference(f, g, pairs, margin=0.7):
    """cirtorch's form on explicit differences ``||f - g||``, summed per tuple, averaged over anchors."""
    total = f.new_zeros(())
    for i in range(len(f)):
        for r in _positives(pairs, i):
            total = total + 0.5 * ((f[i] - g[r]) ** 2).sum()
        for r in _negatives(pairs, i):
            total = total + 0.5 * torch.clamp(margin - _euclidean(f[i], g[r]), min=0) ** 2
    return total / len(f)


def _regression_reference(f, g, pairs=None):
    return sum(1 - torch.dot(f[i], g[i]) for i in range(len(f))) / len(f)


def _triplet_reference(f, g, pairs, margin=0.1):
    losses = []
    for i in range(len(f)):
        for rp in _positives(pairs, i):
            for rn in _negatives(pairs, i):
                losses.append(torch.clamp(torch.dot(f[i], g[rn]) - torch.dot(f[i], g[rp]) + margin, min=0))
    return torch.stack(losses).mean()


def _ms_reference(f, g, pairs, alpha=2.0, beta=50.0, base=0.5):
    losses = []
    for i in range(len(f)):
        pos, neg = _positives(pairs, i), _negatives(pairs, i)
        if not pos and not neg:
            continue
        pos_sum = sum((torch.exp(-alpha * (torch.dot(f[i], g[r]) - base)) for r in pos), f.new_zeros(()))
        neg_sum = sum((torch.exp(beta * (torch.dot(f[i], g[r]) - base)) for r in neg), f.new_zeros(()))
        losses.append(torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta)
    return torch.stack(losses).mean()


def _rkd_reference(f, g, pairs=None, distance_weight=1.0, angle_weight=2.0):
    t = g[: len(f)].detach()
    n = len(f)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    mean_s = sum(_euclidean(f[i], f[j]) for i, j in off) / len(off)
    mean_t = sum(_euclidean(t[i], t[j]) for i, j in off) / len(off)
    distance = sum(_smooth_l1(_euclidean(f[i], f[j]) / mean_s - _euclidean(t[i], t[j]) / mean_t) for i, j in off)
    distance = distance / len(off)

    def cosine(e, i, j, k):
        if i == j or k == j:
            return e.new_zeros(())
        u, v = e[i] - e[j], e[k] - e[j]
        return torch.dot(u / u.norm(), v / v.norm())

    angle = sum(
        _smooth_l1(cosine(f, i, j, k) - cosine(t, i, j, k)) for i in range(n) for j in range(n) for k in range(n)
    )
    return distance_weight * distance + angle_weight * angle / n**3


def _darkrank_reference(f, g, pairs=None, alpha=3.0, beta=3.0):
    t = g[: len(f)].detach()
    losses = []
    for i in range(len(f)):
        others = [j for j in range(len(f)) if j != i]
        ranking = sorted(others, key=lambda j: float(_euclidean(t[i], t[j])))  # descending teacher score
        scores = [-alpha * _euclidean(f[i], f[j]) ** beta for j in ranking]
        log_likelihood = sum(scores[r] - torch.logsumexp(torch.stack(scores[r:]), 0) for r in range(len(scores)))
        losses.append(-log_likelihood)
    return torch.stack(losses).mean()


REFERENCES = {
    "aml_contrastive": _contrastive_reference,
    "aml_contrastive_plus": lambda f, g, pairs: _contrastive_reference(f, g, pairs, include_self=True),
    "aml_regression": _regression_reference,
    "aml_triplet": _triplet_reference,
    "aml_multisimilarity": _ms_reference,
    "rkd": _rkd_reference,
    "darkrank": _darkrank_reference,
}


def _value_and_grad(fn, student):
    value = fn(student)
    (grad,) = torch.autograd.grad(value, student)
    return value, grad


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_loss_and_gradient_match_the_naive_loop(name, seed):
    student, teacher, pairs = _batch(seed)
    loss_fn = create_loss(name, [6, 3, 2], DIM)
    value, grad = _value_and_grad(lambda f: loss_fn(f, None, ref_emb=teacher, indices_tuple=pairs), student)
    ref_value, ref_grad = _value_and_grad(lambda f: REFERENCES[name](f, teacher, pairs), student)
    assert value.dtype == torch.float64 and value.ndim == 0
    assert grad.abs().sum() > 0
    torch.testing.assert_close(value, ref_value, **VALUE_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


@pytest.mark.parametrize(
    ("name", "params", "reference"),
    [
        ("aml_contrastive", {"margin": 0.9}, lambda f, g, t: _contrastive_reference(f, g, t, margin=0.9)),
        ("aml_triplet", {"margin": 0.3}, lambda f, g, t: _triplet_reference(f, g, t, margin=0.3)),
        (
            "aml_multisimilarity",
            {"alpha": 1.0, "beta": 20.0, "base": 0.2},
            lambda f, g, t: _ms_reference(f, g, t, alpha=1.0, beta=20.0, base=0.2),
        ),
        ("rkd", {"distance_weight": 0.5, "angle_weight": 0.0}, lambda f, g, t: _rkd_reference(f, g, t, 0.5, 0.0)),
        ("darkrank", {"alpha": 2.0, "beta": 1.5}, lambda f, g, t: _darkrank_reference(f, g, t, 2.0, 1.5)),
    ],
)
def test_recipe_params_reach_the_loss(name, params, reference):
    student, teacher, pairs = _batch(2)
    loss_fn = create_loss(name, [6, 3, 2], DIM, **params)
    torch.testing.assert_close(loss_fn(student, None, teacher, pairs), reference(student, teacher, pairs), **VALUE_TOL)


def test_contrastive_is_cirtorch_contrastive_on_the_unit_sphere():
    """D from the cosine equals ``||f - g||`` for unit vectors; through the L2 normalisation the gradients agree."""
    _, teacher, pairs = _batch(3)
    raw = torch.randn(B, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    loss_fn = create_loss("aml_contrastive", [6], DIM)
    value, grad = _value_and_grad(lambda x: loss_fn(F.normalize(x, dim=1), None, teacher, pairs), raw)
    ref_value, ref_grad = _value_and_grad(
        lambda x: _cirtorch_contrastive_reference(F.normalize(x, dim=1), teacher, pairs), raw
    )
    torch.testing.assert_close(value, ref_value, **VALUE_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


def test_include_self_adds_exactly_the_self_term():
    student, teacher, pairs = _batch(4)
    plain = create_loss("aml_contrastive", [6], DIM)(student, None, teacher, pairs)
    plus = create_loss("aml_contrastive_plus", [6], DIM)(student, None, teacher, pairs)
    flag = create_loss("aml_contrastive", [6], DIM, include_self=True)(student, None, teacher, pairs)
    self_term = 0.5 * ((student - teacher[:B]) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(plus - plain, self_term, **VALUE_TOL)
    torch.testing.assert_close(flag, plus, rtol=0, atol=0)


def test_multisimilarity_equals_pml_on_mined_pairs():
    student, teacher, pairs = _batch(5)
    ours = create_loss("aml_multisimilarity", [6], DIM)(student, None, teacher, pairs)
    theirs = pml.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)(student, None, pairs, ref_emb=teacher)
    torch.testing.assert_close(ours, theirs, **VALUE_TOL)


def test_multisimilarity_averages_over_anchors_with_pairs_where_pml_averages_over_all():
    student, teacher, (a1, p, a2, n) = _batch(6)
    pairs = (a1[a1 != 0], p[a1 != 0], a2[a2 != 0], n[a2 != 0])  # anchor 0 has no pairs
    ours = create_loss("aml_multisimilarity", [6], DIM)(student, None, teacher, pairs)
    theirs = pml.MultiSimilarityLoss()(student, None, pairs, ref_emb=teacher)
    torch.testing.assert_close(ours, _ms_reference(student, teacher, pairs), **VALUE_TOL)
    torch.testing.assert_close(theirs, ours * (B - 1) / B, **VALUE_TOL)


def test_relational_losses_use_only_the_anchors_teacher_rows():
    student, teacher, _ = _batch(7)
    other_pool = torch.cat([teacher[:B], -teacher[B:]])
    for name in ("aml_regression", "rkd", "darkrank"):
        loss_fn = create_loss(name, [6], DIM)
        torch.testing.assert_close(loss_fn(student, None, teacher), loss_fn(student, None, other_pool))


def test_rkd_and_regression_vanish_when_the_student_is_the_teacher():
    _, teacher, _ = _batch(8)
    anchors = teacher[:B].clone()
    for name in ("rkd", "aml_regression"):
        assert float(create_loss(name, [6], DIM)(anchors, None, teacher)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_the_teacher_gets_no_gradient_and_labels_are_ignored(name):
    student, teacher, pairs = _batch(9)
    teacher = teacher.clone().requires_grad_(True)
    loss_fn = create_loss(name, [6, 3, 2], DIM)
    labels = torch.stack([torch.arange(B), torch.arange(B) // 2], dim=1)
    value = loss_fn(student, labels, ref_emb=teacher, indices_tuple=pairs)
    value.backward()
    assert teacher.grad is None and student.grad is not None
    assert torch.equal(value.detach(), loss_fn(student, None, ref_emb=teacher, indices_tuple=pairs).detach())


@pytest.mark.parametrize("name", NAMES)
def test_losses_keep_no_state(name):
    student, teacher, pairs = _batch(10)
    loss_fn = create_loss(name, [6], DIM)
    assert not list(loss_fn.parameters()) and not list(loss_fn.buffers())
    with torch.no_grad():
        first = loss_fn(student, None, teacher, pairs)
        other, other_teacher, other_pairs = _batch(11)
        loss_fn(other, None, other_teacher, other_pairs)
        assert torch.equal(loss_fn(student, None, teacher, pairs), first)


@pytest.mark.parametrize("name", NAMES)
def test_half_precision_embeddings_are_computed_in_float32(name):
    student, teacher, pairs = _batch(12)
    value = create_loss(name, [6], DIM)(student.detach().bfloat16(), None, teacher.bfloat16(), pairs)
    assert value.dtype == torch.float32 and torch.isfinite(value)


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_or_mismatched_teacher_is_an_error(name):
    student, teacher, pairs = _batch(13)
    loss_fn = create_loss(name, [6], DIM)
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(student, None, indices_tuple=pairs)
    with pytest.raises(ValueError, match="anchors"):
        loss_fn(student, None, teacher[: B - 1], pairs)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(student, None, teacher[:, :-1], pairs)
    with pytest.raises(ValueError, match="shape"):
        loss_fn(student[0], None, teacher, pairs)


@pytest.mark.parametrize("name", TUPLE_NAMES)
def test_pair_losses_need_a_pair_tuple(name):
    student, teacher, (a1, p, a2, n) = _batch(14)
    loss_fn = create_loss(name, [6], DIM)
    assert loss_fn.needs_tuples
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(student, None, teacher)
    with pytest.raises(ValueError, match=r"\(a1, p, a2, n\)"):
        loss_fn(student, None, teacher, (a1, p, n))  # a triplet tuple is not the pair form
    with pytest.raises(ValueError, match="unequal"):
        loss_fn(student, None, teacher, (a1, p[:-1], a2, n))
    with pytest.raises(ValueError, match="integer"):
        loss_fn(student, None, teacher, (a1, p.double(), a2, n))


@pytest.mark.parametrize("name", ["aml_triplet", "aml_multisimilarity", "aml_contrastive"])
def test_no_pairs_gives_a_zero_that_backpropagates(name):
    student, teacher, _ = _batch(15)
    empty = torch.empty(0, dtype=torch.int64)
    value = create_loss(name, [6], DIM)(student, None, teacher, (empty, empty, empty, empty))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("name", ["rkd", "darkrank"])
def test_batch_relations_need_two_samples(name):
    student, teacher, _ = _batch(16)
    with pytest.raises(ValueError, match="B >= 2"):
        create_loss(name, [6], DIM)(student[:1], None, teacher)


def test_registry_builds_every_distillation_loss():
    for name in NAMES:
        loss_fn = create_loss(name, [6, 3, 2], 16)
        assert isinstance(loss_fn, DistillationLoss) and loss_fn.is_distillation
        assert is_distillation_loss(name)
        assert loss_fn.needs_tuples == (name in TUPLE_NAMES)
    assert isinstance(create_loss("aml_contrastive_plus", [6], 16), AsymmetricContrastiveLoss)
    assert create_loss("aml_contrastive_plus", [6], 16).include_self
    assert not create_loss("aml_contrastive", [6], 16).include_self
    assert not is_distillation_loss("multiscale_triplet") and not is_distillation_loss("csl")
