"""``retrieval train``: train an encoder from a YAML recipe, or on your own photos with ``--images``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retrieval.cli.common import console, print_json, recipe_overrides, user_errors

#: The packaged recipe ``--images`` trains when no ``--config`` is given (training/recipes/own-photos.yaml).
OWN_PHOTOS_RECIPE = "own-photos"
DEFAULT_RECIPE = "quickstart"


def train(
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help="A recipe YAML file, or a packaged recipe's name. Default: own-photos with --images, else quickstart.",
    ),
    images: Path | None = typer.Option(
        None,
        "--images",
        help="Training photos: a CSV with a `path` column and label columns (fine[,middle][,coarse], finest first), "
        "a folder holding labels.csv, or a folder of class sub-folders (one level). Sets data.source=csv.",
    ),
    val_images: Path | None = typer.Option(
        None, "--val-images", help="Validation photos in the same form (scored per level at the end)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: --set optim.lr=1e-3 (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (overrides out_dir in the recipe)."),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="Local pretrained backbone weights (safetensors or .pth state dict), for offline use. An encoder "
        "checkpoint of this engine goes to --init-from instead.",
    ),
    init_from: Path | None = typer.Option(
        None,
        "--init-from",
        help="Start from an encoder checkpoint of this engine (OUT/encoder of an earlier run): every layer, and its "
        "architecture, which replaces the recipe's model section.",
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoints/last if present."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON."),
) -> None:
    """Train an encoder; writes OUT/encoder (checkpoint), OUT/config.yaml and OUT/metrics.jsonl.

    Own photos in one command: `retrieval train --images train.csv --val-images val.csv --out runs/mine`.
    Without --config this trains the own-photos recipe: an ImageNet-pretrained ResNet-50 (timm downloads it
    once into the local cache; offline, pass --weights PATH or --set model.pretrained=false), 512-d GeM
    embeddings at 224 px, a normalised-softmax head per label level of the CSV (the heads, sibling batches and
    their parent level follow the number of levels), 600 steps. See docs/training-own-photos.md.

    The recipe's `objective` says what is trained: `metric` (one encoder and a metric loss, the default),
    `mutual` (a DM² cohort that learns together: a `mutual:` section, e.g. --set mutual.size=2; OUT/encoder is
    the cohort's ensemble and OUT/members/<i> each model) or `distillation` (a student query encoder;
    `retrieval distill` is the same with a --teacher option). A `mixup:` section (--set mixup.kind=embedding)
    adds Metrix mixup to a loss with a soft-label form (contrastive, multi-similarity, proxy anchor, ProxyNCA++).

    Config values merge as defaults < recipe < --set overrides; the resolved config is saved beside the
    checkpoint. With schedule.max_minutes the run measures its speed and fits the learning-rate schedule to
    the budget (schedule.fit_to_budget: false keeps the planned one). Interrupt with Ctrl-C and re-run the
    same command to resume.

    Under torchrun (`torchrun --nproc-per-node N -m retrieval.cli.main train ...`) the N processes share each
    batch and take the update one process would take on it; rank 0 alone writes, evaluates and prints.
    """
    with user_errors():
        from training import distributed
        from training.config import load_recipe_config
        from training.recipe_paths import find_recipe
        from training.trainer import train as run_training

        recipe = config or (OWN_PHOTOS_RECIPE if images is not None else DEFAULT_RECIPE)
        overrides = recipe_overrides(
            set_, {**data_options(images, val_images), **start_options(out, weights, init_from)}
        )
        cfg = load_recipe_config(find_recipe(recipe), overrides)
        try:
            result = run_training(cfg, resume=resume, progress=not as_json)
        finally:
            distributed.teardown()  # leaves the torchrun process group, if the run joined one
    if not distributed.is_main_process():  # under torchrun, rank 0 reports for every process
        return
    summary = result.to_dict()
    if as_json:
        print_json(summary)
        return
    if result.val_report is not None:
        console.print(result.val_report.format_table(), highlight=False)
    for line in run_notes(summary):
        console.print(line, highlight=False)
    console.print(
        f"{summary['steps']} steps ({summary['stopped']}), {summary['seconds']:.0f}s this run; "
        f"encoder: {summary['encoder_path']}"
    )
    if summary["extra_paths"]:
        console.print("saved beside it: " + ", ".join(summary["extra_paths"]), highlight=False)


def data_options(images: Path | None, val_images: Path | None) -> dict[str, object]:
    """Config overrides for ``--images`` / ``--val-images`` (``None`` values leave the recipe's settings)."""
    options: dict[str, object] = {"data.val_csv": val_images}
    if images is not None:
        options.update({"data.source": "csv", "data.train_csv": images})
    return options


def start_options(out: Path | None, weights: Path | None, init_from: Path | None) -> dict[str, object]:
    """Config overrides for ``--out``, ``--weights`` and ``--init-from``."""
    return {"out_dir": out, "backbone_weights": weights, "init_from": init_from}


def run_notes(summary: dict[str, Any]) -> list[str]:
    """Plain-language lines about how the run ended: a schedule fitted to a budget, a partial run."""
    from training.budget import BudgetFit

    lines = []
    if summary.get("budget"):
        fit = BudgetFit.from_dict(summary["budget"])
        if fit.shortened:
            lines.append(fit.describe())
    if summary.get("partial"):
        why = {"time_budget": "the time budget was spent", "stop_at_step": "it was asked to stop there"}
        reason = why.get(summary["stopped"], summary["stopped"])
        lines.append(
            f"[bold yellow]stopped early[/] at step {summary['steps']} of {summary['schedule_steps']} ({reason}): "
            "the metrics are those of a partial run, trained before its learning rate had decayed; re-run the "
            "same command to continue, or give schedule.max_minutes more time"
        )
    return lines
