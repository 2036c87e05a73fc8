"""The training loop: batches -> a training objective's loss -> AdamW, with evaluation, checkpoints and resume.

What is trained and how a batch becomes a loss is the objective's business (``training.objectives``: one
encoder with a metric loss, a student distilled from a frozen teacher, ...); ``config.objective`` names it.
Everything else, the same for every objective, lives here.

``sampler.kind: aspect`` swaps the P x K batches for aspect-ratio groups resized jointly to one non-square
size per batch (``training.batches``); the rest of the loop is the same.

Before anything is built, the config is fitted to the run: an ``init_from`` checkpoint's architecture replaces
the ``model`` section (``training.starting_weights``), and the per-level loss and sampler settings follow the
training data's label levels (``training.fit_to_data``). With ``schedule.max_minutes`` the learning-rate
schedule is fitted to the budget once the step time is measured (``training.budget``).

``Trainer(config, train_dataset, val_dataset).fit()`` runs (or continues) a run in ``out_dir``::

    out_dir/
        config.yaml                 the resolved config (defaults + recipe + overrides)
        metrics.jsonl               one line per log step and per evaluation
        checkpoints/last/           encoder + optimiser/scheduler/loss/RNG state (see training.checkpoints)
        encoder/                    the final encoder checkpoint (``models.load_encoder``)

Resuming is bit-exact on CPU: N steps straight and N/2 + resume + N/2 give identical weights, because
the batch stream is a pure function of the step (``training.batches``) and every stateful piece
(optimiser, schedule, loss proxies, grad scaler, RNGs, a schedule fitted to a time budget) is checkpointed.

Under ``torchrun`` the same loop runs in every process (``training.distributed``): each rank loads its slice of
the same global batch, the objective gathers the embeddings, the gradients are synchronised so every rank takes
the update one process would take on the whole batch, and rank 0 alone writes files, evaluates and draws
progress while the others wait. The checkpoint holds no per-rank state, so a run resumes on any world size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.checkpoint import save_encoder
from models.devices import resolve_device
from models.encoder import Encoder
from retrieval.config import ConfigError, save_config
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.sampler import AspectRatioBatchSampler, HierarchicalPKSampler, PKBatchSampler, read_image_sizes
from retrieval.data.transforms import build_transforms
from retrieval.evaluation.report import EvaluationReport
from training import distributed
from training.batches import (
    AspectTrainTransform,
    JointlyResizedSamples,
    MultiView,
    SeededSamples,
    WithIndex,
    step_batches,
)
from training.budget import BudgetFit, StepTimer, fit_schedule
from training.checkpoints import (
    TRAIN_STATE_FILE,
    capture_rng_state,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)
from training.config import TrainConfig
from training.embedding import embed_dataset
from training.fit_to_data import fit_to_data
from training.metrics_log import MetricsLog
from training.objectives.base import Batch, TrainingObjective, create_objective
from training.optim import adamw, build_scheduler
from training.progress import TrainProgress
from training.starting_weights import adopt_checkpoint_architecture, init_provenance
from training.sync_batchnorm import sync_batchnorm

__all__ = ["TrainResult", "Trainer", "train"]

logger = logging.getLogger(__name__)

# Sections whose change between a checkpoint and a resumed run changes what is trained.
_RESUME_SENSITIVE = (
    "objective",
    "data",
    "model",
    "augment",
    "loss",
    "mutual",
    "mixup",
    "sampler",
    "optim",
    "seed",
    "distill",
    "init_from",
)


@dataclass(frozen=True)
class TrainResult:
    """What one ``fit`` call did.

    Attributes:
        steps: the run's step count after this call (including steps of earlier, resumed calls).
        steps_this_run: optimiser steps taken by this call.
        seconds: wall-clock duration of this call (training, evaluation and saving).
        images_per_second: training throughput of this call (data loading + step; no eval or saving).
        stopped: ``"completed"`` (the schedule's last step reached), ``"time_budget"`` or ``"stop_at_step"``.
        final_loss: mean loss over the last logging window (``None`` when no step ran).
        val_report: evaluation on the validation set at the end (``None`` without one).
        encoder_path: the saved final encoder checkpoint.
        encoder_id: its content id.
        planned_steps: the recipe's ``schedule.max_steps``.
        schedule_steps: the steps the learning-rate schedule spans: ``planned_steps``, or fewer when it was
            fitted to a time budget (``budget``).
        budget: the fitted schedule (``training.budget.BudgetFit``), ``None`` when none was fitted.
        extra_paths: encoders saved beside the result (a cohort's models: ``out_dir/members/<i>``).
    """

    steps: int
    steps_this_run: int
    seconds: float
    images_per_second: float
    stopped: str
    final_loss: float | None
    val_report: EvaluationReport | None
    encoder_path: Path
    encoder_id: str
    planned_steps: int = 0
    schedule_steps: int = 0
    budget: BudgetFit | None = None
    extra_paths: tuple[Path, ...] = ()

    @property
    def partial(self) -> bool:
        """Whether the run stopped before its schedule's last step: its metrics are those of a partial run."""
        return self.steps < self.schedule_steps

    @property
    def val_metrics(self) -> dict[str, float] | None:
        """Validation metrics averaged over levels (``{"R@1": ..., "mAP": ...}``), or ``None``."""
        return None if self.val_report is None else dict(self.val_report.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the validation report as its own ``to_dict``)."""
        return {
            "steps": self.steps,
            "steps_this_run": self.steps_this_run,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "stopped": self.stopped,
            "planned_steps": self.planned_steps,
            "schedule_steps": self.schedule_steps,
            "partial": self.partial,
            "budget": None if self.budget is None else self.budget.to_dict(),
            "final_loss": self.final_loss,
            "val": None if self.val_report is None else self.val_report.to_dict(),
            "encoder_path": str(self.encoder_path),
            "encoder_id": self.encoder_id,
            "extra_paths": [str(path) for path in self.extra_paths],
        }


class Trainer:
    """Runs a training objective (an encoder and its loss's proxies, a student and its teacher...) on a
    labelled dataset.

    Building a ``Trainer`` seeds every RNG from ``config.seed`` and creates the objective (``config.objective``
    from ``training.objectives.OBJECTIVES``, unless one is given), optimiser and schedule, so configuration
    mistakes surface before any data is loaded.

    Args:
        config: the run's config.
        train_dataset: labelled training images; its label levels become the encoder's ``levels``.
        val_dataset: optional validation images (same levels), evaluated leave-one-out per level.
        out_dir: run directory; defaults to ``config.out_dir``.
        progress: draw a progress bar on stderr.
        objective: an objective the caller built (its weights are drawn before this seeds the RNGs); by default
            the one ``config.objective`` names, built here after seeding.

    Raises:
        ValueError: datasets that do not fit the config (levels, too few classes for P, unknown loss...).
    """

    def __init__(
        self,
        config: TrainConfig,
        train_dataset: LabelledImageDataset,
        val_dataset: LabelledImageDataset | None = None,
        out_dir: str | Path | None = None,
        *,
        progress: bool = True,
        objective: TrainingObjective | None = None,
    ) -> None:
        _check_datasets(train_dataset, val_dataset)
        out_dir = Path(out_dir) if out_dir is not None else config.out_dir
        config, self.init_info = adopt_checkpoint_architecture(config)
        config = fit_to_data(config, train_dataset)
        model_cfg = config.model.model_copy(update={"levels": list(train_dataset.schema.levels)})
        self.config = config.model_copy(update={"model": model_cfg, "out_dir": out_dir})
        self.out_dir = out_dir
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        # under torchrun: join the process group (each rank on its own GPU); one process: nothing changes
        self.world, self.device = distributed.setup(resolve_device(config.device))
        self.progress = progress and self.world.is_main
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        _seed_everything(config.seed)
        self.use_amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if config.amp_dtype == "float16" else torch.bfloat16
        if objective is None:
            objective = create_objective(self.config, train_dataset)
        self.objective = sync_batchnorm(objective, self.device).to(self.device)
        # the objective may resolve the model section (a student takes its teacher's dimension and id)
        self.config = self.config.model_copy(update={"model": self.objective.model_section()})
        self.objective.set_autocast(self._autocast)
        self.optimizer = adamw(self.objective.param_groups(config.optim), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.sampler = _build_sampler(self.config, train_dataset)
        distributed.check_batch_divisible(self.sampler.batch_size, self.world.size)
        per_rank = {id(param) for param in self.objective.per_rank_parameters()}
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._summed_params = [p for p in trainable if id(p) in per_rank]
        self._averaged_params = [p for p in trainable if id(p) not in per_rank]
        preprocess = self.encoder.config.preprocess  # the trained encoder's own input size (a student's differs)
        if isinstance(self.sampler, AspectRatioBatchSampler):  # the size is chosen per batch
            self.train_transform = AspectTrainTransform(preprocess, config.augment)
        else:
            self.train_transform = build_transforms(preprocess, train=True, augment=config.augment)
            if self.objective.views_per_image > 1:  # one augmentation per cohort model (DM² view diversity)
                self.train_transform = MultiView(self.train_transform, self.objective.views_per_image)
        self.step = 0
        self.images_seen = 0
        self.budget_fit: BudgetFit | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints" / "last"

    @property
    def encoder(self) -> Encoder:
        """The encoder the run produces (the objective's output encoder)."""
        return self.objective.output_encoder()

    # ------------------------------------------------------------------ public API

    def fit(self, resume: bool = True, *, stop_at_step: int | None = None) -> TrainResult:
        """Train to the schedule's last step (``schedule.max_steps``, or fewer once fitted to a time budget), or
        until the budget is spent; then save and evaluate.

        Args:
            resume: continue from ``out_dir/checkpoints/last`` when it exists; ``False`` starts over
                (the old checkpoint is replaced at the next save).
            stop_at_step: stop after this step without changing the schedule (a pre-emptible job's
                slice); a later ``fit()`` resumes from there.
        """
        started = time.perf_counter()
        main = self.world.is_main
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if main:
            save_config(self.config, self.out_dir / "config.yaml")
        resumed = resume and (self.checkpoint_dir / TRAIN_STATE_FILE).is_file()
        if not resumed and self.step > 0:
            raise RuntimeError("this Trainer has already trained; build a new Trainer to start the run over")
        if resumed:
            self._restore(load_training_checkpoint(self.checkpoint_dir, self.objective.checkpoint_encoders()))
            logger.info("resumed %s at step %d", self.checkpoint_dir, self.step)
        elif self.checkpoint_dir.exists() and main:
            logger.warning("starting over; the checkpoint in %s will be replaced", self.checkpoint_dir)
        log = (
            MetricsLog(self.out_dir / "metrics.jsonl", keep_until_step=self.step if resumed else None) if main else None
        )
        with _deterministic(self.config.deterministic):
            run = self._train_until(stop_at_step, log, started)
            if run["stopped"] == "completed" and self.step < self.schedule_steps:
                run["stopped"] = "stop_at_step"
            self._save_checkpoint()
            report = self.evaluate() if main else None
        if report is not None and log is not None:
            log.write(self.step, event="eval", **report.to_dict())
            logger.info("step %d validation:\n%s", self.step, report.format_table())
        encoder_path = self.out_dir / "encoder"
        self._set_provenance()
        encoder_id = save_encoder(self.encoder, encoder_path) if main else ""
        extra_paths = []
        for name, extra in self.objective.extra_outputs().items():  # a cohort's models, beside the ensemble
            self._set_provenance(extra, output=name)
            if main:
                save_encoder(extra, self.out_dir / name)
            extra_paths.append(self.out_dir / name)
        encoder_id = distributed.broadcast_object(encoder_id)  # the other ranks return once the files exist
        train_seconds = run["train_seconds"]
        return TrainResult(
            steps=self.step,
            steps_this_run=run["steps"],
            seconds=time.perf_counter() - started,
            images_per_second=run["images"] / train_seconds if train_seconds > 0 else 0.0,
            stopped=run["stopped"],
            final_loss=run["last_loss"],
            val_report=report,
            encoder_path=encoder_path,
            encoder_id=encoder_id,
            planned_steps=self.config.schedule.max_steps,
            schedule_steps=self.schedule_steps,
            budget=self.budget_fit,
            extra_paths=tuple(extra_paths),
        )

    @property
    def loader_workers(self) -> int:
        """``data.num_workers``, at most the CPUs this process may use: more decoders than cores only contend.

        The batches do not depend on the worker count (``training.batches``), so the cap changes speed only.
        """
        try:
            available = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            available = os.cpu_count() or 1
        return min(self.config.data.num_workers, available)

    @property
    def schedule_steps(self) -> int:
        """The steps the learning-rate schedule spans: ``schedule.max_steps``, or fewer once fitted to a budget."""
        return self.budget_fit.steps if self.budget_fit is not None else self.config.schedule.max_steps

    def embed(self, dataset: LabelledImageDataset, encoder: Encoder | None = None) -> np.ndarray:
        """Embed ``dataset`` with ``encoder`` (default: the trained one) and that encoder's evaluation transform.

        Returns float32 ``(N, D)``, L2-normalised rows.
        """
        return embed_dataset(
            self.encoder if encoder is None else encoder,
            dataset,
            device=self.device,
            batch_size=self.config.eval_batch_size,
            num_workers=self.loader_workers,
            autocast=self._autocast,
        )

    def evaluate(self) -> EvaluationReport | None:
        """Leave-one-out retrieval metrics per level on the validation set (``None`` without one).

        Under ``torchrun`` the trainer calls it on rank 0 only (the others wait at their next collective).
        """
        if self.val_dataset is None:
            return None
        return self.objective.evaluate(self.val_dataset, lambda encoder, dataset: self.embed(dataset, encoder))

    # ------------------------------------------------------------------ the loop

    def _train_until(self, stop_at_step: int | None, log: MetricsLog | None, started: float) -> dict[str, Any]:
        cfg = self.config
        budget = cfg.schedule.max_minutes * 60.0 if cfg.schedule.max_minutes else None
        run: dict[str, Any] = {"steps": 0, "images": 0, "train_seconds": 0.0, "stopped": "completed", "last_loss": None}
        target = self._target(stop_at_step)
        if self.step >= target:
            return run
        timer = StepTimer(budget) if budget and cfg.schedule.fit_to_budget and self.budget_fit is None else None
        window = _Window(self.device)
        batches = self._batches(self.step)
        with TrainProgress(target, self.step, enabled=self.progress) as bar:
            while self.step < target:
                tick = time.perf_counter()
                images, labels, indices = next(batches)
                loss, lr, grad_norm = self._train_step(images, labels, indices)
                elapsed = time.perf_counter() - tick
                count = len(images) * self.world.size  # the global batch
                self.step += 1
                self.images_seen += count
                run["steps"] += 1
                run["images"] += count
                run["train_seconds"] += elapsed
                window.add(loss, grad_norm, count, elapsed)
                if timer is not None:
                    timer.record(elapsed)
                    if distributed.agree(timer.ready, self.device):  # rank 0's clock decides for every rank
                        assert budget is not None  # a timer exists only with a budget
                        self._fit_to_budget(timer, budget, started, log)
                        timer = None
                        target = self._target(stop_at_step)
                        bar.set_total(target)
                if self.step % cfg.log_every == 0 or self.step == target:
                    run["last_loss"] = self._log_window(window, lr, log, bar)
                else:
                    bar.update(self.step)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < target and log is not None:
                    self._evaluate_and_log(log)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < target:
                    self._save_checkpoint()
                over_budget = budget is not None and time.perf_counter() - started > budget
                if budget is not None and distributed.agree(over_budget, self.device) and self.step < target:
                    run["stopped"] = "time_budget"
                    logger.warning(
                        "time budget of %.2f min spent at step %d of %d: stopping early; this is a partial run",
                        cfg.schedule.max_minutes,
                        self.step,
                        self.schedule_steps,
                    )
                    break
        batches.close()  # shuts down DataLoader workers now rather than at garbage collection
        if window.steps:
            run["last_loss"] = self._log_window(window, self.optimizer.param_groups[0]["lr"], log, None)
        return run

    def _target(self, stop_at_step: int | None) -> int:
        """The step this ``fit`` call trains to: the schedule's end, or ``stop_at_step`` before it."""
        end = self.schedule_steps
        return end if stop_at_step is None else max(self.step, min(stop_at_step, end))

    def _fit_to_budget(self, timer: StepTimer, budget: float, started: float, log: MetricsLog | None) -> None:
        """Shorten the schedule to the steps that fit the budget (``training.budget``); logged once.

        Under ``torchrun`` rank 0 measures and fits, and every rank takes its fit (one schedule for all).
        """
        cfg = self.config
        fit: BudgetFit | None = None
        if self.world.is_main:
            evaluates = 0 < cfg.eval_every < cfg.schedule.max_steps  # periodic evaluations inside the run
            eval_seconds = self._estimate_eval_seconds() if evaluates else 0.0
            fit = fit_schedule(
                planned_steps=cfg.schedule.max_steps,
                warmup_steps=cfg.schedule.resolved_warmup_steps(),
                step=self.step,
                elapsed_seconds=time.perf_counter() - started,  # the evaluation probe's own cost included
                budget_seconds=budget,
                step_seconds=timer.step_seconds,
                eval_seconds=eval_seconds,
                eval_every=cfg.eval_every if evaluates else 0,
            )
        fit = distributed.broadcast_object(fit)
        assert fit is not None  # rank 0 always fits
        self.budget_fit = fit
        if fit.shortened:
            for schedule in self.scheduler.lr_lambdas:  # the WarmupCosine of every group (stored in checkpoints)
                schedule.warmup_steps = fit.warmup_steps
                schedule.max_steps = fit.steps
            # the next step's learning rate already follows the fitted schedule
            last = self.scheduler.last_epoch
            for group, base, schedule in zip(
                self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * schedule(last)
            if self.world.is_main:
                logger.warning(fit.describe())
        else:
            logger.info(fit.describe())
        if log is not None:
            log.write(self.step, event="budget", **fit.to_dict())

    def _estimate_eval_seconds(self) -> float:
        """Seconds one periodic evaluation will take: a timed embedding of a slice of the validation set, scaled."""
        if self.val_dataset is None:
            return 0.0
        count = min(len(self.val_dataset), self.config.eval_batch_size)
        tick = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed: leave the run's RNG untouched
            self.embed(self.val_dataset.subset(np.arange(count)))
        return (time.perf_counter() - tick) * len(self.val_dataset) / count

    def _batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if isinstance(self.sampler, AspectRatioBatchSampler):  # keys carry the batch's joint (height, width)
            long_side = self.config.model.preprocess.input_size
            shape_of = partial(self.sampler.batch_shape, long_side=long_side)
            samples: Dataset = WithIndex(JointlyResizedSamples(self.train_dataset, self.train_transform))
            keys = step_batches(self.sampler, start_step, self.config.seed, shape_of=shape_of)
        else:
            samples = WithIndex(SeededSamples(self.train_dataset.with_transform(self.train_transform)))
            keys = step_batches(self.sampler, start_step, self.config.seed)
        if self.world.distributed:  # every rank draws the global batch and loads its own slice of it
            keys = distributed.shard_keys(keys, self.world.rank, self.world.size)
        loader = DataLoader(
            samples,
            batch_sampler=keys,
            num_workers=self.loader_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.config.seed),
        )
        yield from loader

    def _train_step(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        self.objective.train()
        images = images.to(self.device, non_blocking=True)
        views = images.unbind(1) if images.ndim == 5 else ()  # (B, views, 3, H, W) from MultiView
        batch = Batch(
            images=views[0] if views else images,  # under torchrun, this rank's slice; labels are global
            labels=distributed.gather_tensor(labels.to(self.device, non_blocking=True)),
            indices=distributed.gather_tensor(indices.to(self.device, non_blocking=True)),
            step=self.step,
            epoch=self.step // len(self.sampler),
            epochs_done=self.step / len(self.sampler),
            views=views,
        )
        loss = self.objective.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # under torchrun: encoders' gradients summed, the loss's proxies' averaged (training.distributed)
        distributed.sync_gradients(self._summed_params, self._averaged_params)
        grad_norm = None
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), lr, grad_norm

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _log_window(self, window: _Window, lr: float, log: MetricsLog | None, bar: TrainProgress | None) -> float:
        loss, grad_norm, ips = window.summary()
        window.reset()
        if not math.isfinite(loss) and not self.scaler.is_enabled():
            raise FloatingPointError(
                f"the loss became {loss} at step {self.step}: training diverged; "
                "lower optim.lr, raise schedule.warmup_steps or set grad_clip"
            )
        epoch = self.step // len(self.sampler)
        if log is not None:
            log.write(
                self.step, event="train", epoch=epoch, loss=loss, lr=lr, grad_norm=grad_norm, images_per_second=ips
            )
        if bar is not None:
            bar.update(self.step, loss=loss, images_per_second=ips)
        return loss

    def _evaluate_and_log(self, log: MetricsLog) -> None:
        report = self.evaluate()
        if report is not None:
            log.write(self.step, event="eval", **report.to_dict())
            summary = ", ".join(f"{k} {100 * v:.2f}" for k, v in report.mean.items())
            logger.info("step %d validation (mean over levels): %s", self.step, summary)

    # ------------------------------------------------------------------ checkpoints

    def _set_provenance(self, encoder: Encoder | None = None, **extra: Any) -> None:
        """Record how the run's result (or ``encoder``, one of its extra outputs) was trained in its config."""
        encoder = self.encoder if encoder is None else encoder
        provenance = {
            **self.config.model.provenance,
            "recipe": self.config.name,
            "steps": self.step,
            "dataset": _describe_dataset(self.train_dataset, self.config),
            "train_images": len(self.train_dataset),
            **({"init_from": init_provenance(self.init_info)} if self.init_info is not None else {}),
            **self.objective.provenance(),
            "seed": self.config.seed,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        }
        encoder.config = encoder.config.model_copy(update={"provenance": provenance})

    def _save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; under ``torchrun`` the others wait until it is in place."""
        if self.world.is_main:
            self._write_checkpoint()
        distributed.barrier()

    def _write_checkpoint(self) -> None:
        self._set_provenance()
        state = {
            "step": self.step,
            "epoch": self.step // len(self.sampler),
            "batch_in_epoch": self.step % len(self.sampler),
            "images_seen": self.images_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            **self.objective.state_dict_extra(),
            "rng": capture_rng_state(),
            "config": self.config.model_dump_json(),
        }
        if self.budget_fit is not None:
            state["budget_fit"] = self.budget_fit.to_dict()
        save_training_checkpoint(self.checkpoint_dir, self.objective.checkpoint_encoders(), state)
        save_config(self.config, self.checkpoint_dir / "config.yaml")

    def _restore(self, state: dict[str, Any]) -> None:
        _warn_on_config_change(state.get("config"), self.config)
        self.objective.load_state_dict_extra(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.images_seen = int(state.get("images_seen", 0))
        if state.get("budget_fit"):  # the schedule fitted to the budget when the run started (already in "scheduler")
            self.budget_fit = BudgetFit.from_dict(state["budget_fit"])


def train(config: TrainConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Build the datasets named by ``config.data`` and run (or resume) the training in ``config.out_dir``."""
    from training.data_factory import build_datasets

    train_dataset, val_dataset = build_datasets(config.data)
    return Trainer(config, train_dataset, val_dataset, progress=progress).fit(resume=resume)


class _Window:
    """Running sums between two log lines, kept on the device so a step never waits for the GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.grad_norm = torch.zeros((), device=self.device)
        self.has_grad_norm = False
        self.steps = 0
        self.images = 0
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, images: int, seconds: float) -> None:
        self.loss += loss.float()
        if grad_norm is not None:
            self.grad_norm += grad_norm.float()
            self.has_grad_norm = True
        self.steps += 1
        self.images += images
        self.seconds += seconds

    def summary(self) -> tuple[float, float | None, float]:
        steps = max(self.steps, 1)
        loss = float(self.loss) / steps
        grad_norm = float(self.grad_norm) / steps if self.has_grad_norm else None
        return loss, grad_norm, self.images / self.seconds if self.seconds > 0 else 0.0


def _check_datasets(train: LabelledImageDataset, val: LabelledImageDataset | None) -> None:
    if len(train) == 0:
        raise DatasetError("the training dataset is empty")
    if val is None:
        return
    if val.schema.levels != train.schema.levels:
        raise DatasetError(f"validation levels {val.schema.levels} differ from training levels {train.schema.levels}")
    if len(val) < 2:
        raise DatasetError(f"the validation dataset needs at least 2 images for leave-one-out, got {len(val)}")


def _build_sampler(config: TrainConfig, dataset: LabelledImageDataset) -> PKBatchSampler | AspectRatioBatchSampler:
    """The batch sampler ``config.sampler`` names.

    Plain P x K over the fine classes, sibling groups under a parent level when ``sampler.siblings > 1``, or
    aspect-ratio groups for ``sampler.kind: aspect`` (every image's size is read once, from its file header).
    """
    cfg = config.sampler
    if cfg.kind == "aspect":
        assert cfg.batch_size is not None  # enforced by SamplerConfig's validator
        if cfg.batch_size > len(dataset):
            raise ConfigError(f"sampler.batch_size={cfg.batch_size} exceeds the {len(dataset)} training images")
        return AspectRatioBatchSampler(read_image_sizes(dataset), cfg.batch_size, seed=config.seed)
    if cfg.siblings == 1:
        return PKBatchSampler(dataset.level_labels(0), cfg.classes_per_batch, cfg.images_per_class, seed=config.seed)
    assert cfg.parent_level is not None  # resolved from the data's levels by training.fit_to_data
    try:
        return HierarchicalPKSampler(
            dataset.labels,
            cfg.classes_per_batch,
            cfg.images_per_class,
            siblings=cfg.siblings,
            parent_level=dataset.schema.index(cfg.parent_level),
            seed=config.seed,
        )
    except ValueError as exc:  # labels that do not nest under the parent level
        raise DatasetError(f"sampler.siblings groups fine classes under sampler.parent_level, but: {exc}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def _describe_dataset(dataset: LabelledImageDataset, config: TrainConfig) -> str:
    for attribute in ("csv_path", "root"):
        value = getattr(dataset, attribute, None)
        if value is not None:
            return str(value)
    if config.data.source == "synthetic":
        return f"synthetic(seed={config.data.synthetic.seed})"
    return type(dataset).__name__


def _warn_on_config_change(saved: str | None, current: TrainConfig) -> None:
    if not saved:
        return
    before = json.loads(saved)
    now = json.loads(current.model_dump_json())
    for config in (before, now):  # worker count changes speed, not results
        config.get("data", {}).pop("num_workers", None)
    changed = [key for key in _RESUME_SENSITIVE if before.get(key) != now.get(key)]
    if changed:
        logger.warning("resuming with a changed config (%s); the run is no longer reproducible", ", ".join(changed))
