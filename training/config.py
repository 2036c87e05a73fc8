"""The typed training config: every knob of a run, loadable from a YAML recipe plus overrides.

Load it with ``retrieval.config.load_config(TrainConfig, "recipe.yaml", ["optim.lr=1e-3"])``; unknown
keys are errors naming the key. The resolved config is written next to the run's outputs so any
run can be repeated from that one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from models.encoder import EncoderConfig
from retrieval.config import StrictModel
from retrieval.data.synthetic import SyntheticConfig
from retrieval.data.transforms import AugmentConfig, PreprocessConfig

__all__ = [
    "CONFIG_TYPES",
    "DataConfig",
    "DistillConfig",
    "DistillSection",
    "LossConfig",
    "MixupConfig",
    "MutualConfig",
    "MutualMember",
    "OptimConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_recipe_config",
    "recipe_objective",
]


class DataConfig(StrictModel):
    """Where the training and validation images come from.

    Attributes:
        source: ``"synthetic"`` generates the built-in hierarchical dataset in memory (no files needed);
            ``"csv"`` reads labelled image lists; ``"dyml"`` reads an official DyML release (``dyml_root``);
            ``"landmarks"`` reads a Google-Landmarks-v2 style CSV (``landmarks_csv``), one ``fine`` level.
        synthetic: generator settings for ``source: synthetic`` (its train and val splits are used).
        train_csv: training CSV (``path`` + level columns), or a folder holding ``labels.csv``.
        val_csv: optional validation CSV; without it the run is not evaluated. DyML ships no validation
            split (its test sets are for ``retrieval evaluate dyml``), so ``dyml`` runs validate only on this.
            With ``source: landmarks`` it is read as a landmarks CSV too (images under ``landmarks_images``).
        dyml_root: the DyML-Vehicle/Animal/Product dataset root for ``source: dyml``; training reads
            ``train/label.csv`` and ``train/imgs/`` (see ``retrieval.data.dyml``), always at all three levels.
        landmarks_csv: the label file for ``source: landmarks``: GLDv2's ``train_clean.csv``
            (``landmark_id,images``), ``train.csv`` (``id,landmark_id``) or ``path,landmark_id``
            (see ``retrieval.data.landmarks``).
        landmarks_images: the GLDv2 image folder (``<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` below it); needed by
            the id layouts; for ``path`` CSVs it replaces the CSV's folder as the base of relative paths.
        sfm120k_root: the SfM-120k folder (``retrieval-SfM-120k.pkl`` + ``ims/``) for ``source: sfm120k``, the
            cirtorch training set used by AML; one level ``fine`` = the 3-D reconstruction cluster, and the
            official query/positive pairs feed the distillation miner. Its ``val`` split validates.
        levels: label columns to read from the CSVs, finest first; default all of fine/middle/coarse present.
        num_workers: DataLoader worker processes (0 decodes in the training process).
    """

    source: Literal["synthetic", "csv", "dyml", "landmarks", "sfm120k"] = "synthetic"
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    train_csv: Path | None = None
    val_csv: Path | None = None
    dyml_root: Path | None = None
    landmarks_csv: Path | None = None
    landmarks_images: Path | None = None
    sfm120k_root: Path | None = None
    levels: list[str] | None = None
    num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _source_needs_its_files(self) -> DataConfig:
        if self.source == "csv" and self.train_csv is None:
            raise ValueError("data.train_csv is required when data.source is 'csv' (retrieval train --images CSV)")
        if self.source == "dyml" and self.dyml_root is None:
            raise ValueError("data.dyml_root is required when data.source is 'dyml'")
        if self.source == "dyml" and self.levels is not None and self.levels != ["fine", "middle", "coarse"]:
            raise ValueError("data.levels cannot be chosen with data.source 'dyml' (it trains on fine, middle, coarse)")
        if self.source == "sfm120k" and self.sfm120k_root is None:
            raise ValueError("data.sfm120k_root is required when data.source is 'sfm120k'")
        if self.source == "landmarks" and self.landmarks_csv is None:
            raise ValueError("data.landmarks_csv is required when data.source is 'landmarks'")
        if self.source == "landmarks" and self.levels is not None and self.levels != ["fine"]:
            raise ValueError("data.levels cannot be chosen with data.source 'landmarks' (one level: fine = landmark)")
        return self


class LossConfig(StrictModel):
    """A registered loss (``training.losses.LOSSES``) and its keyword parameters.

    ``params.levels`` may name label levels (``[fine, coarse]``) or give column indices.
    """

    name: str = "multiscale_normsoftmax"
    params: dict[str, Any] = Field(default_factory=dict)


class SamplerConfig(StrictModel):
    """How training batches are drawn: P x K over the finest level, or aspect-ratio groups.

    ``kind: pk`` (the default) gives P classes with K images each (batch size P * K), square inputs.
    ``kind: aspect`` gives ``batch_size`` images of similar aspect ratio, labels ignored
    (``retrieval.data.sampler.AspectRatioBatchSampler``); each batch is resized jointly so that its long side
    is ``model.preprocess.input_size`` and its short side follows the batch's median ratio (a multiple of 32),
    see ``training.batches``. It suits classification losses (ArcFace on GLDv2), which need no positives in
    the batch; pair losses want ``pk``.

    Attributes:
        kind: ``"pk"`` or ``"aspect"``.
        classes_per_batch, images_per_class: P and K (``kind: pk``).
        siblings: draw the P fine classes in groups of this many that share a class at ``parent_level``
            (``retrieval.data.sampler.HierarchicalPKSampler``); 1 draws them independently. Siblings in a
            batch are the hard negatives that teach the finer levels apart. ``kind: pk`` only. With one
            label level there is no parent, and siblings are turned off (``training.fit_to_data``).
        parent_level: the label level whose classes group the siblings; ``null`` (the default) takes the
            level just above the finest in the training data (``middle`` for fine/middle/coarse, ``coarse``
            for fine/coarse). A named level must be one of the data's levels and coarser than the finest.
        batch_size: images per batch for ``kind: aspect`` (required there, refused with ``pk``).

    ``classes_per_batch`` larger than the number of fine classes in the training data is lowered to that
    number (every batch then holds all classes), with a warning; see ``training.fit_to_data``.
    """

    kind: Literal["pk", "aspect"] = "pk"
    classes_per_batch: int = Field(16, ge=1)
    images_per_class: int = Field(4, ge=1)
    siblings: int = Field(1, ge=1)
    parent_level: str | None = None
    batch_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _siblings_fit_the_batch(self) -> SamplerConfig:
        if self.siblings > self.classes_per_batch:
            raise ValueError(f"siblings ({self.siblings}) cannot exceed classes_per_batch ({self.classes_per_batch})")
        if self.kind == "aspect" and self.batch_size is None:
            raise ValueError("sampler.batch_size is required when sampler.kind is 'aspect'")
        if self.kind == "aspect" and self.siblings > 1:
            raise ValueError("sampler.siblings applies to sampler.kind 'pk' only (aspect batches ignore labels)")
        if self.kind == "pk" and self.batch_size is not None:
            raise ValueError(
                "sampler.batch_size applies to sampler.kind 'aspect'; P x K batches hold "
                "classes_per_batch x images_per_class images"
            )
        return self


class OptimConfig(StrictModel):
    """AdamW settings; see ``training.optim`` for the parameter groups."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    gem_p_lr_mult: float = Field(10.0, ge=0)
    loss_lr_mult: float = Field(1.0, ge=0)


class ScheduleConfig(StrictModel):
    """Step budget, warm-up and an optional wall-clock budget.

    Attributes:
        max_steps: optimiser steps of the full run (the cosine schedule spans them): the planned steps.
        warmup_steps: linear warm-up steps at the start; ``null`` means 5% of ``max_steps``.
        max_minutes: a wall-clock budget for one ``fit`` call (training, periodic evaluations and checkpoints;
            the final evaluation and save come after it). With ``fit_to_budget`` the run measures its speed over
            its first steps and shortens the schedule to the steps that fit (``training.budget``); whatever
            happens, it stops cleanly (checkpoint and final encoder saved) once the budget is spent, and says
            so: ``partial: true`` in the result when the schedule did not finish.
        fit_to_budget: shorten the schedule to the budget (the cosine ends at the last step that fits, the
            warm-up scaled in proportion). The number of steps, and so the result, then depends on the machine's
            speed and load; the fitted schedule is logged, written to ``metrics.jsonl`` and stored in the
            checkpoint, so a resumed run keeps it. ``false`` keeps the planned schedule and only stops at the
            budget, possibly with the learning rate still high.
        final_lr_ratio: learning rate at the end of the cosine, as a fraction of the peak.
    """

    max_steps: int = Field(1000, ge=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_minutes: float | None = Field(None, gt=0)
    fit_to_budget: bool = True
    final_lr_ratio: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _warmup_inside_run(self) -> ScheduleConfig:
        if self.warmup_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps})")
        return self

    def resolved_warmup_steps(self) -> int:
        """The warm-up length in steps (the explicit value, or 5% of the run)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(0.05 * self.max_steps)


class MixupConfig(StrictModel):
    """Metrix (Venkataramanan et al., ICLR 2022): mixup for metric learning, a ``mixup:`` section in any recipe.

    Each step mixes, for every anchor of the batch that has a negative, one of its positives (the anchor itself
    when it has none) with one of its negatives, ``lam ~ Beta(alpha, alpha)``; the mixed item is ``lam`` parts
    positive. The loss's soft-label form (``training.losses.soft``: contrastive, multi-similarity, proxy anchor,
    ProxyNCA++) scores the mixed embeddings against the clean anchors (or the proxies), and the total is
    ``clean loss + weight * mixed loss``. See ``training.mixup``.

    Attributes:
        kind: what is mixed: ``input`` (the images; one extra encoder pass), ``feature`` (the last feature map
            before pooling; an extra pooling + head only) or ``embedding`` (the L2-normalised embeddings,
            re-normalised after mixing; nearly free).
        alpha: the Beta distribution's parameter (2 in the paper).
        weight: the mixed loss's weight ``w`` (0.4 in the paper).
        level: the label level whose classes decide positives and negatives when pairs are drawn; ``null`` is the
            finest. Soft targets are formed at every level the loss uses.
    """

    kind: Literal["input", "feature", "embedding"] = "embedding"
    alpha: float = Field(2.0, gt=0)
    weight: float = Field(0.4, ge=0)
    level: str | None = None


class MutualMember(StrictModel):
    """One model of a DM² cohort: what differs from the recipe's ``model`` and ``loss``.

    Attributes:
        model: overrides of the recipe's ``model`` section (``backbone``, ``embedding_dim``, ``attention``...);
            ``preprocess`` cannot differ (the cohort trains on one batch stream and its ensemble on one input).
        loss: this model's metric loss; ``null`` takes the recipe's ``loss``.
    """

    model: dict[str, Any] = Field(default_factory=dict)
    loss: LossConfig | None = None

    @model_validator(mode="after")
    def _same_input(self) -> MutualMember:
        if "preprocess" in self.model:
            raise ValueError(
                "mutual.members[].model.preprocess cannot differ between cohort models: they share the batches"
            )
        return self


class MutualConfig(StrictModel):
    """DM², Diversified Mutual Metric Learning (Park et al.): a cohort of models trained together, a ``mutual:``
    section in any recipe (it makes the run's ``objective`` ``mutual``; see ``training.objectives.mutual``).

    Each model minimises its own metric loss plus ``lam`` times the mean squared difference between its batch
    distance matrix and every partner's (the partners' matrices without gradient); ``lam`` rises linearly from 0
    to ``weight`` over the first ``warmup_epochs``. The run saves every model (``members/<i>``) and, as its
    result, the ensemble (the models' embeddings concatenated and re-normalised).

    Attributes:
        size: the number of models ``L`` when ``members`` is empty (copies of the recipe's model).
        members: one entry per model (then ``size`` is ``len(members)``): architecture and loss overrides.
        weight: the relation loss's final weight (20 in the paper).
        warmup_epochs: epochs of the linear warm-up of ``weight`` (3 in the paper; 0 starts at ``weight``).
        model_diversity: each model starts from its own random initial weights (heads, and backbones not loaded
            from pretrained weights); ``false`` starts every same-architecture model identically.
        temporal_diversity: model ``l`` (1-based) takes an optimiser step with probability ``2^-(l-1)``, the
            first always; the draws are a function of ``(seed, step, l)``, so resuming repeats them.
        view_diversity: each model sees its own random augmentation of the batch (``sampler.kind: pk`` only).
    """

    size: int = Field(2, ge=2)
    members: list[MutualMember] = Field(default_factory=list)
    weight: float = Field(20.0, ge=0)
    warmup_epochs: float = Field(3.0, ge=0)
    model_diversity: bool = True
    temporal_diversity: bool = True
    view_diversity: bool = True

    @model_validator(mode="after")
    def _cohort_of_two_or_more(self) -> MutualConfig:
        if len(self.members) == 1:
            raise ValueError("mutual.members lists one model; a cohort needs at least two")
        return self

    @property
    def cohort_size(self) -> int:
        return len(self.members) or self.size


class TrainConfig(StrictModel):
    """A complete training run.

    Attributes:
        name: recipe name, recorded in the encoder's provenance.
        objective: what is trained and how a batch becomes a loss (``training.objectives.OBJECTIVES``):
            ``metric`` (one encoder, ``loss`` from the registry), ``mutual`` (a DM² cohort; a ``mutual`` section
            selects it) or ``distillation`` (a student distilled from a frozen teacher; ``retrieval distill`` and
            ``DistillConfig``).
        mutual: DM² mutual learning of a cohort (``MutualConfig``); ``null`` trains one model.
        mixup: Metrix mixup (``MixupConfig``) for the metric loss of the model (of every cohort model).
        eval_every: evaluate on the validation set every N steps (0: only at the end).
        checkpoint_every: write ``checkpoints/last`` every N steps (0: only at the end).
        log_every: write a metrics line every N steps.
        grad_clip: clip the global gradient norm to this value (``null`` disables clipping).
        amp: mixed precision on CUDA (ignored on CPU).
        amp_dtype: ``float16`` (with loss scaling) or ``bfloat16``.
        deterministic: ask torch for deterministic kernels (needed for bit-exact resume on CUDA; slower).
        device: ``auto`` picks CUDA when available.
        cpu_threads: torch intra-op threads (``null`` keeps torch's default). On a shared CPU machine 1-2
            threads avoid the large slowdown of OpenMP threads spinning against other processes.
        eval_batch_size: batch size for embedding the validation set.
        backbone_weights: a local file of pretrained backbone weights (safetensors, or a ``.pth`` state
            dict read with ``weights_only=True``) loaded when the run starts; the offline alternative to
            ``model.pretrained: true``, which downloads through timm. ``retrieval train --weights PATH``.
            An encoder checkpoint of this engine is refused there: use ``init_from``.
        init_from: an encoder checkpoint directory of this engine to start from, every layer included
            (backbone, attention, pooling, head); ``retrieval train --init-from DIR``. The architecture is the
            checkpoint's: the ``model`` section is replaced by the checkpoint's (a warning names the keys
            that differed), its weights are verified against their recorded SHA-256, and the provenance of
            the new encoder records the checkpoint (``init_from``). Excludes ``backbone_weights``.
        out_dir: run directory (config, metrics, checkpoints, final encoder).
    """

    name: str = "custom"
    objective: str = "metric"
    data: DataConfig = Field(default_factory=DataConfig)
    model: EncoderConfig = Field(default_factory=EncoderConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    mutual: MutualConfig | None = None
    mixup: MixupConfig | None = None
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(500, ge=0)
    log_every: int = Field(10, ge=1)
    grad_clip: float | None = Field(5.0, gt=0)
    amp: bool = True
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int | None = Field(None, ge=1)
    seed: int = 0
    eval_batch_size: int = Field(128, ge=1)
    backbone_weights: Path | None = None
    init_from: Path | None = None
    out_dir: Path = Path("runs/train")

    @model_validator(mode="before")
    @classmethod
    def _mutual_section_selects_its_objective(cls, data: Any) -> Any:
        """A ``mutual`` section makes a metric run a cohort run; ``objective: mutual`` alone takes the defaults."""
        if not isinstance(data, dict):
            return data
        objective = data.get("objective", "metric")
        if data.get("mutual") is not None and objective == "metric":
            return {**data, "objective": "mutual"}
        if objective == "mutual" and data.get("mutual") is None:
            return {**data, "mutual": {}}
        return data

    @model_validator(mode="after")
    def _options_fit_the_objective(self) -> TrainConfig:
        if self.mutual is not None and self.objective != "mutual":
            raise ValueError(f"the mutual section trains a cohort (objective mutual), not objective {self.objective!r}")
        if self.mixup is not None and self.objective not in ("metric", "mutual"):
            raise ValueError(f"mixup applies to metric-learning objectives (metric, mutual), not {self.objective!r}")
        if self.mutual is not None and self.mutual.view_diversity and self.sampler.kind != "pk":
            raise ValueError("mutual.view_diversity needs sampler.kind 'pk' (aspect batches are resized jointly)")
        return self

    @model_validator(mode="after")
    def _one_source_of_starting_weights(self) -> TrainConfig:
        if self.init_from is not None and self.backbone_weights is not None:
            raise ValueError(
                "init_from (--init-from) and backbone_weights (--weights) both give starting weights; pass one"
            )
        return self


class DistillSection(StrictModel):
    """What distillation needs beyond a training run (``retrieval distill``; Asymmetric Metric Learning).

    Attributes:
        teacher: the frozen teacher's encoder checkpoint directory (the encoder that builds the gallery index).
        num_negatives: hard negatives mined per query in the teacher's space (``k``, 5 in the paper), for the
            losses that use tuples (``aml_contrastive``, ``aml_contrastive_plus``, ``aml_triplet``,
            ``aml_multisimilarity``).
        pool_size: training images ranked per epoch when mining; ``null`` ranks all of them.
        cache_dir: where the teacher's embeddings of the training images are cached (keyed by teacher id and
            data fingerprint); default ``<out_dir>/teacher-cache``.
        teacher_embeddings: an existing cache entry to use (refused when another teacher or other data made it).
        teacher_batch_size: images per teacher forward pass when the cache is built.
    """

    teacher: Path | None = None
    num_negatives: int = Field(5, ge=1)
    pool_size: int | None = Field(20000, ge=1)
    cache_dir: Path | None = None
    teacher_embeddings: Path | None = None
    teacher_batch_size: int = Field(64, ge=1)


class DistillConfig(TrainConfig):
    """A distillation run: a student (``model``) trained into a frozen teacher's space with a distillation
    loss (``loss``), in the same loop, with the same sections, as any training run.

    The student's ``embedding_dim`` is the teacher's (set from the teacher, whatever the recipe says), its
    ``teacher_id`` is the teacher's id, and its input size is its own (``model.preprocess``). Without a ``model``
    section the student is AML's: EfficientNet-B3 at its native 300 px.
    """

    objective: str = "distillation"
    model: EncoderConfig = Field(default_factory=lambda: _default_student())
    distill: DistillSection = Field(default_factory=DistillSection)
    loss: LossConfig = Field(default_factory=lambda: LossConfig(name="aml_regression"))
    out_dir: Path = Path("runs/distill")


def _default_student() -> EncoderConfig:
    return EncoderConfig(backbone="efficientnet_b3", preprocess=PreprocessConfig(input_size=300))


#: The config type of each objective: a recipe's ``objective`` picks the sections it may hold.
CONFIG_TYPES: dict[str, type[TrainConfig]] = {
    "metric": TrainConfig,
    "mutual": TrainConfig,
    "distillation": DistillConfig,
}


def recipe_objective(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The ``objective`` a recipe file (with overrides) names; ``metric`` when it names none.

    Raises:
        ConfigError: an unreadable recipe or an unknown objective.
    """
    import yaml

    from retrieval.config import ConfigError, apply_overrides

    try:
        raw = yaml.safe_load(Path(recipe).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read recipe {recipe}: {exc}") from None
    objective = apply_overrides(raw if isinstance(raw, dict) else {}, overrides).get("objective", "metric")
    if objective not in CONFIG_TYPES:
        raise ConfigError(f"objective: unknown {objective!r}; valid: {', '.join(CONFIG_TYPES)}")
    return str(objective)


def load_recipe_config(recipe: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load a recipe file with the config type its ``objective`` names (a metric ``TrainConfig`` by default).

    Raises:
        ConfigError: an unreadable recipe, an unknown objective, or values that do not validate.
    """
    from retrieval.config import load_config

    return load_config(CONFIG_TYPES[recipe_objective(recipe, overrides)], recipe, overrides)
