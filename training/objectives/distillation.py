"""Asymmetric Metric Learning: a student query encoder distilled into a frozen teacher's embedding space.

The teacher (any encoder checkpoint: GLAM-ResNet101, or whatever built the gallery index) is loaded frozen
and in eval mode; its embeddings of the training images are computed once and memory-mapped
(``training.teacher_cache``), so a step runs only the student. Each step:

1. the student embeds the batch's query images at its own input size;
2. losses that use tuples get one positive and ``k`` hard negatives per query, mined in the teacher's space
   against the student's query vectors (``training.mining``);
3. the loss compares the student's vectors with the teacher's: ``ref_emb`` holds the teacher's vectors of the
   queries themselves first (row ``i`` is ``g(q_i)``), then those of the mined positives and negatives, and
   ``indices_tuple`` = ``(a1, p, a2, n)`` names the positive and negative pairs (pytorch-metric-learning's
   convention; see ``training.losses.distillation``).

The student checkpoint records the teacher's id (``EncoderConfig.teacher_id``), which is how indexes, search,
serving and evaluation accept it for the teacher's index and refuse it for any other.

Under ``torchrun`` the student's vectors of every rank's slice are gathered before mining and the loss, so both
see the global batch; rank 0 embeds the teacher's cache first and the other ranks read it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.checkpoint import CheckpointError, load_encoder
from models.devices import resolve_device
from models.encoder import Encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import LabelledImageDataset
from retrieval.evaluation.asymmetric import ASYMMETRIC, evaluate_asymmetric
from retrieval.evaluation.report import EvaluationReport
from training.distributed import gather_embeddings, main_process_first
from training.embedding import embed_dataset
from training.losses import available_losses, create_loss, is_distillation_loss
from training.mining import AsymmetricTupleMiner, MinedTuples
from training.objectives.base import OBJECTIVES, Batch, EmbedFn, TrainingObjective
from training.optim import param_groups
from training.starting_weights import build_encoder
from training.teacher_cache import TeacherCache, data_fingerprint, open_teacher_cache

if TYPE_CHECKING:
    from training.config import DistillConfig, OptimConfig

__all__ = ["DistillationObjective"]

logger = logging.getLogger(__name__)


@OBJECTIVES.register("distillation")
class DistillationObjective(TrainingObjective):
    """A student encoder trained against a frozen teacher with a distillation loss of the registry.

    Args:
        config: a ``DistillConfig`` (``distill.teacher`` is required; ``model`` describes the student).
        train_dataset: the training images (their labels give the mining clusters: the finest level).

    Raises:
        ConfigError: no teacher, or a loss that is not a distillation loss.
        CheckpointError: a teacher that is not an encoder checkpoint.
        TeacherCacheError: an explicit teacher cache from another teacher or other data.
    """

    def __init__(self, config: DistillConfig, train_dataset: LabelledImageDataset) -> None:
        super().__init__()
        distill = config.distill
        if distill.teacher is None:
            raise ConfigError(
                "distill.teacher is required: the teacher's encoder checkpoint (retrieval distill --teacher)"
            )
        if not is_distillation_loss(config.loss.name):
            valid = ", ".join(name for name in available_losses() if is_distillation_loss(name))
            raise ConfigError(f"loss {config.loss.name!r} is not a distillation loss; use one of {valid}")
        self.config = config
        device = resolve_device(config.device)
        teacher = load_encoder(distill.teacher, device=device)
        for param in teacher.parameters():
            param.requires_grad_(False)
        self.teacher = teacher.eval()
        self.teacher_id = str(teacher.encoder_id)
        self.teacher_path = str(distill.teacher)
        student_config = _student_config(config, teacher)
        self.student = build_encoder(config, student_config)
        num_classes = [train_dataset.vocab.num_classes(k) for k in range(train_dataset.schema.num_levels)]
        self.loss_fn = create_loss(config.loss.name, num_classes, student_config.embedding_dim, **config.loss.params)
        with main_process_first():  # under torchrun rank 0 embeds and writes the cache; the others then read it
            self.cache = self._open_cache(train_dataset, device)
        self._table = torch.from_numpy(self.cache.embeddings)  # a view of the memory map, read lazily
        positives = _official_positives(train_dataset)
        self.miner = AsymmetricTupleMiner(
            train_dataset.level_labels(0), distill.num_negatives, distill.pool_size, config.seed, positives
        )
        self._pool_vectors: tuple[int, torch.Tensor] | None = None
        self._val_teacher: tuple[int, np.ndarray] | None = None
        self.last_reports: dict[str, EvaluationReport] = {}

    # ------------------------------------------------------------------ the seam

    def output_encoder(self) -> Encoder:
        return self.student

    def param_groups(self, optim: OptimConfig) -> list[dict[str, Any]]:
        return param_groups(self.student, self.loss_fn, optim)

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics and dropout stay as the teacher was trained
        return self

    def loss(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            student = self.student(batch.images)
        student = gather_embeddings(student.float())  # under torchrun: the global batch's, as labels and indices
        positions = batch.indices.cpu().numpy()
        if not getattr(self.loss_fn, "needs_tuples", False):
            return self.loss_fn(student, batch.labels, ref_emb=self._teacher_rows(positions, student.device))
        tuples = self.miner.mine(
            student, positions, self._pool(batch.epoch, student.device), epoch=batch.epoch, step=batch.step
        )
        ref_positions, indices_tuple = _reference_layout(positions, tuples, student.device)
        ref_emb = self._teacher_rows(ref_positions, student.device)
        return self.loss_fn(student, batch.labels, ref_emb=ref_emb, indices_tuple=indices_tuple)

    def state_dict_extra(self) -> dict[str, Any]:
        return {"loss": self.loss_fn.state_dict(), "teacher_id": self.teacher_id}

    def load_state_dict_extra(self, state: dict[str, Any]) -> None:
        saved = state.get("teacher_id")
        if saved != self.teacher_id:
            raise CheckpointError(
                f"this checkpoint was distilled from teacher {saved}, but the run's teacher is {self.teacher_id}; "
                "use the same teacher or start over with --no-resume"
            )
        self.loss_fn.load_state_dict(state["loss"])

    def evaluate(self, dataset: LabelledImageDataset, embed: EmbedFn) -> EvaluationReport:
        """Asymmetric leave-one-out retrieval: student queries against the teacher's gallery of the same images.

        The symmetric scores (student on both sides) and the teacher's own are kept in ``last_reports``.
        """
        student = embed(self.student, dataset)
        if self._val_teacher is None or self._val_teacher[0] != id(dataset):
            self._val_teacher = (id(dataset), embed(self.teacher, dataset))
        teacher = self._val_teacher[1]
        self.last_reports = evaluate_asymmetric(student, teacher, dataset.labels, schema=dataset.schema)
        asymmetric = self.last_reports[ASYMMETRIC]
        return asymmetric

    def provenance(self) -> dict[str, Any]:
        return {
            "objective": "distillation",
            "loss": self.config.loss.name,
            "teacher_id": self.teacher_id,
            "teacher_path": self.teacher_path,
        }

    # ------------------------------------------------------------------ helpers

    def _open_cache(self, dataset: LabelledImageDataset, device: torch.device) -> TeacherCache:
        distill = self.config.distill
        fingerprint = data_fingerprint(dataset, self.teacher.config.preprocess.model_dump_json())

        def compute() -> np.ndarray:
            logger.info("embedding %d training images with the teacher (once; cached)", len(dataset))
            return embed_dataset(
                self.teacher,
                dataset,
                device=device,
                batch_size=distill.teacher_batch_size,
                num_workers=self.config.data.num_workers,
                progress="teacher",
            )

        return open_teacher_cache(
            self.teacher_id,
            fingerprint,
            len(dataset),
            compute,
            cache_dir=distill.cache_dir or self.config.out_dir / "teacher-cache",
            explicit=distill.teacher_embeddings,
            teacher_path=self.teacher_path,
        )

    def _teacher_rows(self, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        return self._table[torch.as_tensor(positions, dtype=torch.long)].to(device)

    def _pool(self, epoch: int, device: torch.device) -> torch.Tensor:
        if self._pool_vectors is None or self._pool_vectors[0] != epoch:
            self._pool_vectors = (epoch, self._teacher_rows(self.miner.pool(epoch), device))
        return self._pool_vectors[1]


def _student_config(config: DistillConfig, teacher: Encoder) -> Any:
    """The student's architecture: the recipe's ``model`` in the teacher's dimension, recording the teacher.

    A student started from a checkpoint (``init_from``) keeps that checkpoint's dimension, which must then be the
    teacher's.
    """
    model = config.model
    if config.init_from is not None and model.embedding_dim != teacher.embedding_dim:
        raise ConfigError(
            f"init_from: {config.init_from} embeds in {model.embedding_dim} dimensions but the teacher in "
            f"{teacher.embedding_dim}; a student must embed in its teacher's dimension"
        )
    if model.projection == "before_pooling" and teacher.config.projection == "after_pooling":
        logger.warning(
            "the student projects before GeM, so its vectors are non-negative, but the teacher ends in a linear "
            "layer (a signed space the student cannot reach); model.projection: after_pooling fits this teacher"
        )
    if model.embedding_dim != teacher.embedding_dim:
        logger.info(
            "student embedding_dim set to the teacher's %d (recipe: %d)", teacher.embedding_dim, model.embedding_dim
        )
    return model.model_copy(update={"embedding_dim": teacher.embedding_dim, "teacher_id": str(teacher.encoder_id)})


def _official_positives(dataset: LabelledImageDataset) -> dict[int, list[int]] | None:
    """``{query: [positives]}`` from a dataset that ships positive pairs (SfM-120k's ``qidxs``/``pidxs``)."""
    queries = getattr(dataset, "query_indices", None)
    positives = getattr(dataset, "positive_indices", None)
    if queries is None or positives is None:
        return None
    pairs: dict[int, list[int]] = {}
    for query, positive in zip(np.asarray(queries).tolist(), np.asarray(positives).tolist(), strict=True):
        pairs.setdefault(int(query), []).append(int(positive))
    return pairs


def _reference_layout(
    positions: np.ndarray, tuples: MinedTuples, device: torch.device
) -> tuple[np.ndarray, tuple[torch.Tensor, ...]]:
    """Teacher rows to gather (the queries first, then positives, then negatives) and the pair indices."""
    count = len(positions)
    has_positive = np.flatnonzero(tuples.positives >= 0)
    neg_rows, neg_cols = np.nonzero(tuples.negatives >= 0)
    ref_positions = np.concatenate(
        [positions, tuples.positives[has_positive], tuples.negatives[neg_rows, neg_cols]]
    ).astype(np.int64)
    a1 = has_positive
    p = count + np.arange(len(has_positive))
    a2 = neg_rows
    n = count + len(has_positive) + np.arange(len(neg_rows))
    indices = tuple(torch.as_tensor(x, dtype=torch.long, device=device) for x in (a1, p, a2, n))
    return ref_positions, indices
