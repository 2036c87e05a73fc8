"""``retrieval train``: train an encoder from a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from retrieval.cli.common import console, print_json, recipe_overrides, user_errors


def train(
    config: str = typer.Option(
        "quickstart", "--config", "-c", help="A recipe YAML file, or the name of a packaged recipe (e.g. quickstart)."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config value: --set optim.lr=1e-3 (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (overrides out_dir in the recipe)."),
    weights: Path | None = typer.Option(
        None, "--weights", help="Local pretrained backbone weights (safetensors or .pth state dict), for offline use."
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoints/last if present."),
    as_json: bool = typer.Option(False, "--json", help="Print the training summary as JSON."),
) -> None:
    """Train an encoder; writes OUT/encoder (checkpoint), OUT/config.yaml and OUT/metrics.jsonl.

    The recipe's `objective` says what is trained: `metric` (one encoder and a metric loss, the default) or
    `distillation` (a student query encoder; `retrieval distill` is the same with a --teacher option).

    Config values merge as defaults < recipe < --set overrides; the resolved config is
    saved beside the checkpoint. Interrupt with Ctrl-C and re-run the same command to resume.
    """
    with user_errors():
        from training.config import load_recipe_config
        from training.recipe_paths import find_recipe
        from training.trainer import train as run_training

        overrides = recipe_overrides(set_, {"out_dir": out, "backbone_weights": weights})
        cfg = load_recipe_config(find_recipe(config), overrides)
        result = run_training(cfg, resume=resume, progress=not as_json)
    summary = result.to_dict()
    if as_json:
        print_json(summary)
        return
    if result.val_report is not None:
        console.print(result.val_report.format_table(), highlight=False)
    console.print(
        f"{summary['steps']} steps ({summary['stopped']}), {summary['seconds']:.0f}s this run; "
        f"encoder: {summary['encoder_path']}"
    )
