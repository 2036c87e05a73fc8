"""Fit the learning-rate schedule to a wall-clock budget (``schedule.max_minutes``).

A run that simply stops when its time is up stops anywhere: at step 135 of 600 the learning rate is still
near its peak and the model is a snapshot of a run in progress. With ``schedule.fit_to_budget`` the trainer
measures its speed instead, and shortens the schedule to the steps that fit:

* the first :data:`SKIP_STEPS` steps are not timed (they pay for lazy initialisation, DataLoader start-up
  and the allocator's first requests), then :class:`StepTimer` times steps (data loading included,
  evaluations and checkpoints excluded) until it has :data:`MAX_MEASURED` of them, or at least
  :data:`MIN_MEASURED` and a :data:`MEASURE_FRACTION` of the budget;
* :func:`fit_schedule` turns the measured seconds per step, plus the cost of the periodic evaluations
  (``eval_every``) spread over the steps, into the last step that fits in :data:`SAFETY` of the remaining
  budget. The cosine then spans the fitted steps and the warm-up is scaled in proportion; a schedule is
  only ever shortened.

The result depends on the machine's speed and load, so it is logged once, written to ``metrics.jsonl``
(``event: budget``) and stored in the training checkpoint: a resumed run keeps the schedule it started with.
If the estimate was optimistic, the budget check still stops the run, which then reports itself as partial.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MAX_MEASURED",
    "MEASURE_FRACTION",
    "MIN_MEASURED",
    "SAFETY",
    "SKIP_STEPS",
    "BudgetFit",
    "StepTimer",
    "fit_schedule",
]

SKIP_STEPS = 2
MIN_MEASURED = 3
MAX_MEASURED = 10
MEASURE_FRACTION = 0.1
SAFETY = 0.95


@dataclass(frozen=True)
class BudgetFit:
    """A schedule fitted to a time budget.

    Attributes:
        planned_steps: the recipe's ``schedule.max_steps``.
        steps: the steps the fitted schedule spans (at most ``planned_steps``).
        warmup_steps: the fitted warm-up.
        step_seconds: measured seconds per training step.
        eval_seconds: estimated seconds per periodic evaluation (0 without ``eval_every``).
        decided_at_step: the step after which the schedule was fitted.
        budget_seconds: the budget the steps were fitted to.
    """

    planned_steps: int
    steps: int
    warmup_steps: int
    step_seconds: float
    eval_seconds: float
    decided_at_step: int
    budget_seconds: float

    @property
    def shortened(self) -> bool:
        return self.steps < self.planned_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (what a ``weights_only`` checkpoint and the JSON summary hold)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BudgetFit:
        return cls(
            planned_steps=int(data["planned_steps"]),
            steps=int(data["steps"]),
            warmup_steps=int(data["warmup_steps"]),
            step_seconds=float(data["step_seconds"]),
            eval_seconds=float(data["eval_seconds"]),
            decided_at_step=int(data["decided_at_step"]),
            budget_seconds=float(data["budget_seconds"]),
        )

    def describe(self) -> str:
        """One sentence for the log and the printed summary."""
        evals = f" + {self.eval_seconds:.1f} s per evaluation" if self.eval_seconds else ""
        if not self.shortened:
            return (
                f"time budget {self.budget_seconds / 60:.2f} min: all {self.planned_steps} planned steps fit "
                f"({self.step_seconds:.3f} s/step measured{evals})"
            )
        return (
            f"time budget {self.budget_seconds / 60:.2f} min: {self.step_seconds:.3f} s/step measured{evals}, so the "
            f"learning-rate schedule is fitted to {self.steps} of {self.planned_steps} planned steps (warm-up "
            f"{self.warmup_steps}); the result depends on this machine's speed (schedule.fit_to_budget: false keeps "
            "the planned schedule)"
        )


class StepTimer:
    """Collects the durations of the steps after the first :data:`SKIP_STEPS` of one ``fit`` call.

    Args:
        budget_seconds: the run's budget (how long measuring may take is a fraction of it).
    """

    def __init__(self, budget_seconds: float) -> None:
        self.budget_seconds = budget_seconds
        self.seen = 0
        self.durations: list[float] = []

    def record(self, seconds: float) -> None:
        """One step's wall time (data loading and the optimiser step; no evaluation or checkpoint)."""
        self.seen += 1
        if self.seen > SKIP_STEPS:
            self.durations.append(seconds)

    @property
    def ready(self) -> bool:
        """Whether enough steps were timed to fit the schedule."""
        measured = len(self.durations)
        if measured >= MAX_MEASURED:
            return True
        return measured >= MIN_MEASURED and sum(self.durations) >= MEASURE_FRACTION * self.budget_seconds

    @property
    def step_seconds(self) -> float:
        """Mean seconds per timed step (the median would hide the periodic slow steps a budget must pay for)."""
        return sum(self.durations) / len(self.durations) if self.durations else 0.0


def fit_schedule(
    *,
    planned_steps: int,
    warmup_steps: int,
    step: int,
    elapsed_seconds: float,
    budget_seconds: float,
    step_seconds: float,
    eval_seconds: float = 0.0,
    eval_every: int = 0,
) -> BudgetFit:
    """The schedule that fits the rest of the budget after ``step`` steps and ``elapsed_seconds``.

    Each further step costs ``step_seconds`` plus ``eval_seconds / eval_every`` (the periodic evaluations
    spread over the steps); the steps that fit in :data:`SAFETY` of the remaining time are added to ``step``,
    never beyond ``planned_steps`` and never fewer than one. The warm-up shrinks in proportion and stays shorter
    than the run.
    """
    per_step = step_seconds + (eval_seconds / eval_every if eval_every else 0.0)
    remaining = max(0.0, budget_seconds - elapsed_seconds)
    more = math.floor(SAFETY * remaining / per_step) if per_step > 0 else planned_steps
    steps = min(planned_steps, step + max(1, more))
    if steps >= planned_steps:
        steps, warmup = planned_steps, warmup_steps
    else:
        warmup = min(round(warmup_steps * steps / planned_steps), steps - 1)
    return BudgetFit(
        planned_steps=planned_steps,
        steps=steps,
        warmup_steps=max(0, warmup),
        step_seconds=step_seconds,
        eval_seconds=eval_seconds,
        decided_at_step=step,
        budget_seconds=budget_seconds,
    )
