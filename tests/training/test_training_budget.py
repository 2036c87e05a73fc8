"""A time budget fits the learning-rate schedule to the steps that fit, and a resumed run keeps that schedule."""

from __future__ import annotations

import pytest
import torch

from retrieval.data.synthetic import SyntheticConfig, generate_split
from training.budget import MAX_MEASURED, SKIP_STEPS, BudgetFit, StepTimer, fit_schedule
from training.checkpoints import TRAIN_STATE_FILE
from training.config import TrainConfig
from training.metrics_log import read_metrics
from training.optim import warmup_cosine
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = SyntheticConfig(seed=2, image_size=32, num_colours=2, num_textures=2, train_per_class=4, val_per_class=1)


def test_fit_schedule_fills_the_remaining_budget_and_scales_the_warmup():
    fit = fit_schedule(
        planned_steps=600, warmup_steps=30, step=12, elapsed_seconds=10.0, budget_seconds=30.0, step_seconds=0.5
    )
    assert fit.steps == 12 + int(0.95 * 20.0 / 0.5)  # 38 more steps in 95% of the 20 s left
    assert fit.warmup_steps == round(30 * fit.steps / 600) and fit.shortened
    with_evals = fit_schedule(
        planned_steps=600,
        warmup_steps=30,
        step=12,
        elapsed_seconds=10.0,
        budget_seconds=30.0,
        step_seconds=0.5,
        eval_seconds=5.0,
        eval_every=10,
    )
    assert with_evals.steps == 12 + int(0.95 * 20.0 / (0.5 + 5.0 / 10))  # an evaluation every 10 steps costs 0.5 s/step
    roomy = fit_schedule(
        planned_steps=100, warmup_steps=5, step=12, elapsed_seconds=1.0, budget_seconds=600.0, step_seconds=0.1
    )
    assert (roomy.steps, roomy.warmup_steps, roomy.shortened) == (100, 5, False)  # never lengthened
    spent = fit_schedule(
        planned_steps=100, warmup_steps=5, step=12, elapsed_seconds=40.0, budget_seconds=30.0, step_seconds=0.1
    )
    assert spent.steps == 13 and spent.warmup_steps < spent.steps  # at least one more step, warm-up inside
    assert BudgetFit.from_dict(fit.to_dict()) == fit


def test_step_timer_skips_the_first_steps_and_waits_for_enough_samples():
    timer = StepTimer(budget_seconds=100.0)
    for _ in range(SKIP_STEPS):
        timer.record(50.0)  # start-up steps: never counted
    assert timer.durations == [] and not timer.ready
    for seconds in (1.0, 2.0, 3.0):
        timer.record(seconds)
    assert not timer.ready  # 3 steps but only 6 s of a 100 s budget measured
    timer.record(4.0)
    assert timer.ready and timer.step_seconds == pytest.approx(2.5)  # 10 s = 10% of the budget
    capped = StepTimer(budget_seconds=1e6)
    for _ in range(SKIP_STEPS + MAX_MEASURED):
        capped.record(0.01)
    assert capped.ready


def _config(out_dir, eval_every: int = 0, **schedule) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "eval_every": eval_every,
            "name": "budget-test",
            "data": {"synthetic": TINY.model_dump()},
            "model": {"backbone": "resnet10t", "embedding_dim": 16, "preprocess": {"input_size": 32}},
            "sampler": {"classes_per_batch": 4, "images_per_class": 2},
            "schedule": schedule,
            "log_every": 5,
            "checkpoint_every": 0,
            "device": "cpu",
            "out_dir": str(out_dir),
        }
    )


@pytest.fixture(scope="module")
def tiny_train():
    return generate_split(TINY, "train")


@pytest.fixture(scope="module")
def tiny_val():
    return generate_split(TINY, "val")


def test_a_budget_shortens_the_schedule_and_a_resumed_run_keeps_it(tiny_train, tiny_val, tmp_path):
    planned = 5000  # far more than fits in 6 s on any machine
    config = _config(tmp_path, eval_every=20, max_steps=planned, max_minutes=0.1)
    trainer = Trainer(config, tiny_train, tiny_val, progress=False)
    result = trainer.fit()

    fit = result.budget
    assert fit is not None and fit.shortened and fit.planned_steps == planned
    assert fit.eval_seconds > 0  # the periodic evaluations are part of what must fit
    assert result.planned_steps == planned and result.schedule_steps == fit.steps < planned
    assert fit.decided_at_step >= SKIP_STEPS + 3 and result.steps <= fit.steps
    assert result.partial == (result.steps < fit.steps)
    assert result.partial == (result.stopped == "time_budget")
    schedule = trainer.scheduler.lr_lambdas[0]
    assert (schedule.max_steps, schedule.warmup_steps) == (fit.steps, fit.warmup_steps)  # the cosine spans them
    expected_lr = trainer.config.optim.lr * warmup_cosine(result.steps, fit.warmup_steps, fit.steps)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)
    events = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "budget"]
    assert len(events) == 1 and events[0]["steps"] == fit.steps and events[0]["step"] == fit.decided_at_step
    state = torch.load(tmp_path / "checkpoints" / "last" / TRAIN_STATE_FILE, weights_only=True)
    assert BudgetFit.from_dict(state["budget_fit"]) == fit
    summary = result.to_dict()
    assert summary["planned_steps"] == planned and summary["schedule_steps"] == fit.steps
    assert summary["budget"]["steps"] == fit.steps and summary["partial"] == result.partial

    # resumed with plenty of time: the fitted schedule is kept (no re-fit, no return to the planned 5000 steps)
    again = _config(tmp_path, eval_every=20, max_steps=planned, max_minutes=30)
    resumed = Trainer(again, tiny_train, tiny_val, progress=False).fit()
    assert resumed.budget == fit and resumed.schedule_steps == fit.steps
    assert resumed.steps == fit.steps and not resumed.partial and resumed.stopped == "completed"
    assert len([r for r in read_metrics(tmp_path / "metrics.jsonl") if r["event"] == "budget"]) == 1


def test_fit_to_budget_false_keeps_the_planned_schedule_and_reports_a_partial_run(tiny_train, tmp_path):
    config = _config(tmp_path, max_steps=50, max_minutes=1e-6, fit_to_budget=False)
    trainer = Trainer(config, tiny_train, None, progress=False)
    result = trainer.fit()
    assert result.stopped == "time_budget" and result.steps == 1 and result.budget is None
    assert (result.planned_steps, result.schedule_steps, result.partial) == (50, 50, True)
    assert trainer.scheduler.lr_lambdas[0].max_steps == 50
