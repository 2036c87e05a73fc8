"""``retrieval distill``: distil a small query encoder (student) into a gallery encoder's (teacher's) space."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, recipe_overrides, user_errors
from retrieval.cli.train_cmd import data_options, run_notes, start_options


def distill(
    config: str = typer.Option(
        "aml-synthetic-cpu",
        "--config",
        "-c",
        help="A distillation recipe YAML file, or a packaged one (aml-synthetic-cpu, aml-effnetb3-glam).",
    ),
    teacher: Path | None = typer.Option(
        None, "--teacher", help="The teacher's encoder checkpoint: the encoder that builds (built) the gallery index."
    ),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Training photos: a CSV with `path` and label columns, a folder holding labels.csv, or a folder of "
        "class sub-folders (sets data.source=csv). Mining uses the finest level.",
    ),
    val_images: Path | None = typer.Option(None, "--val-images", help="Validation photos in the same form."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: --set loss.name=aml_contrastive_plus."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (overrides out_dir in the recipe)."),
    weights: Path | None = typer.Option(
        None, "--weights", help="Local pretrained weights for the student's backbone (safetensors or .pth)."
    ),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Start the student from an encoder checkpoint of this engine (every layer and its architecture; its "
        "dimension must be the teacher's).",
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoints/last if present."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (and the evaluations) as JSON."),
) -> None:
    """Train a student query encoder with Asymmetric Metric Learning against a frozen teacher.

    The teacher embeds the training images once (cached under OUT/teacher-cache, keyed by teacher and data);
    the student (the recipe's `model`, projected to the teacher's dimension) learns to embed queries into the
    teacher's space with the recipe's distillation loss (aml_regression, aml_contrastive, aml_contrastive_plus,
    aml_triplet, aml_multisimilarity, rkd, darkrank). OUT/encoder is the student; it records the teacher's id,
    so `retrieval search --index INDEX --query-encoder OUT/encoder` accepts it for the teacher's index only.
    With validation data, the student is scored asymmetrically (student queries, teacher gallery) and
    symmetrically, beside the teacher.
    """
    with user_errors():
        from retrieval.config import ConfigError
        from training import distributed
        from training.config import load_recipe_config, recipe_objective
        from training.data_factory import build_datasets
        from training.recipe_paths import find_recipe
        from training.trainer import Trainer

        options = {
            **data_options(images, val_images),
            **start_options(out, weights, init_from),
            "distill.teacher": teacher,
        }
        overrides = recipe_overrides(set_, options)
        recipe = find_recipe(config)
        objective = recipe_objective(recipe, overrides)
        if objective != "distillation":
            raise ConfigError(f"{config} is not a distillation recipe (objective {objective}); use retrieval train")
        cfg = load_recipe_config(recipe, overrides)
        train_dataset, val_dataset = build_datasets(cfg.data)
        trainer = Trainer(cfg, train_dataset, val_dataset, progress=not as_json)
        try:
            result = trainer.fit(resume=resume)
        finally:
            distributed.teardown()  # leaves the torchrun process group, if the run joined one
        reports = getattr(trainer.objective, "last_reports", {})
        teacher_id = trainer.encoder.config.teacher_id
    if not distributed.is_main_process():  # under torchrun, rank 0 reports for every process
        return
    summary = {
        **result.to_dict(),
        "teacher_id": teacher_id,
        "evaluation": {mode: report.to_dict() for mode, report in reports.items()},
    }
    if as_json:
        print_json(summary)
        return
    for mode, report in reports.items():
        console.print(f"[bold]{mode}[/] ({_describe(mode)})", highlight=False)
        console.print(report.format_table(), highlight=False)
    for line in run_notes(summary):
        console.print(line, highlight=False)
    console.print(
        f"{summary['steps']} steps ({summary['stopped']}), {summary['seconds']:.0f}s this run; "
        f"student: {summary['encoder_path']} (teacher {summary['teacher_id']})"
    )


def _describe(mode: str) -> str:
    return {
        "asymmetric": "student queries, teacher gallery",
        "symmetric": "student on both sides",
        "teacher": "teacher on both sides",
    }.get(mode, mode)
