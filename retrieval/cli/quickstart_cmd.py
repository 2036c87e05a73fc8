"""``retrieval quickstart``: the whole engine end to end on the built-in synthetic gallery."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from retrieval.cli.common import console, err_console, print_json, user_errors


def quickstart(
    work_dir: Path = typer.Option(Path("quickstart-run"), "--work-dir", help="Where every artifact is written."),
    minutes: float | None = typer.Option(
        None,
        "--minutes",
        min=0.05,
        help="Cap the gallery encoder's training at this many minutes (default: no cap, the recipe's full step "
        "count is trained however slow the machine; a capped run reports the steps it reached).",
    ),
    student_minutes: float | None = typer.Option(
        None,
        "--student-minutes",
        min=0.05,
        help="Cap the student query encoder's distillation at this many minutes (default: no cap).",
    ),
    student_set: list[str] = typer.Option(
        [], "--student-set", help="Override a value of the student's distillation recipe (repeatable)."
    ),
    distill: bool = typer.Option(
        True, "--distill/--no-distill", help="Distil a small student query encoder into the gallery encoder's space."
    ),
    seed: int = typer.Option(0, help="Seed for the data, the model and the sampler."),
    set_: list[str] = typer.Option([], "--set", help="Override a training-recipe value (repeatable)."),
    device: str = typer.Option("cpu", help="Torch device (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics and artifact paths as JSON."),
) -> None:
    """Generate a synthetic gallery, train, index, distil a query encoder, export, search, report per level.

    Steps: synthetic hierarchical dataset (coarse shape family > shape > shape x colour x
    texture, open-set test classes) -> train the gallery encoder on CPU (a fixed number of
    steps: the same quality on any machine, only sooner or later) -> index the test gallery
    -> calibrate its granularity thresholds on the labelled validation images -> per-level
    Recall@1 / mAP against chance -> distil a small student query encoder into its space
    (Asymmetric Metric Learning) -> score the student's queries against the teacher's index
    -> export both to ONNX and time one query each -> sample searches with the student ->
    contact sheet PNG -> the `retrieval serve` and `retrieval search` commands.
    """
    from retrieval.cli.quickstart_pipeline import QuickstartOptions, run_quickstart

    options = QuickstartOptions(
        work_dir=work_dir,
        minutes=minutes,
        seed=seed,
        overrides=tuple(set_),
        device=device,
        progress=not as_json,
        student_minutes=student_minutes,
        student_overrides=tuple(student_set),
        distill=distill,
    )
    with user_errors():
        result = run_quickstart(options, announce=lambda msg: err_console.print(f"[bold cyan]>[/] {msg}"))
    if as_json:
        print_json(result.to_dict())
        return
    _print_summary(result.to_dict())


def _print_summary(result: dict[str, Any]) -> None:
    from rich.table import Table

    metrics, chance, training = result["metrics"], result["chance"], result["training"]
    title = "Open-set retrieval on the synthetic test gallery (each image queries all others)"
    table = Table(title=title + _partial_note(training))
    for column in ("level", "R@1", "chance R@1", "mAP", "chance mAP"):
        table.add_column(column, justify="right" if column != "level" else "left")
    for level, values in [*metrics["per_level"].items(), ("mean", metrics["mean"])]:
        ref = chance["per_level"].get(level, chance["mean"]) if level != "mean" else chance["mean"]
        table.add_row(level, _pct(values["R@1"]), _pct(ref["R@1"]), _pct(values["mAP"]), _pct(ref["mAP"]))
    console.print(table)
    console.print(
        f"trained {_steps(training)} in {training['seconds']:.0f}s "
        f"({training.get('images_per_second', 0):.0f} img/s); "
        f"ONNX vs PyTorch min cosine {training['onnx_min_cosine']:.6f}"
    )
    if result.get("calibration"):
        _print_calibration(result["calibration"])
    if result.get("student"):
        _print_student(result["metrics"], result["student"])
    for sample in result["samples"]:
        query = sample["labels"]
        console.print(f"\n[bold]query[/] {sample['query']}  ({' / '.join(query.values())})", highlight=False)
        for rank, hit in enumerate(sample["hits"], start=1):
            same = [lvl for lvl, name in hit["labels"].items() if query.get(lvl) == name]
            tag = f"same {same[0]}" if same else "different"
            level = f"level {hit.get('level') or 'none'}" if result.get("calibration") else ""
            name = hit["labels"].get("fine", "?")
            console.print(f"  {rank}. {hit['score']:.3f}  {name:<28} {tag:<12} {level}".rstrip(), highlight=False)
    _print_partial_runs(result)
    _print_commands(result)


def _print_calibration(calibration: dict[str, Any]) -> None:
    """The thresholds the served index uses for ``granularity`` searches, and what calibration warned about."""
    levels = ", ".join(
        f"{e['level']} {e['threshold']:.3f} (precision {e['precision']:.2f}, recall {e['recall']:.2f})"
        for e in calibration["levels"]
    )
    console.print(
        f"granularity thresholds, calibrated on {calibration['images']} labelled validation images "
        f"for the {calibration.get('queries_by', 'index encoder')}'s queries (objective {calibration['objective']}): "
        f"{levels}",
        highlight=False,
    )
    for warning in calibration.get("warnings") or []:
        console.print(f"[yellow]calibration warning:[/] {warning}", highlight=False)


def _print_partial_runs(result: dict[str, Any]) -> None:
    """Say plainly, at the end where it is read, when a --minutes cap cut a training short (stopped at the cap,
    or its schedule shortened to fit it: either way fewer steps than the recipe's, and lower numbers)."""
    runs = [("gallery encoder", "--minutes", result["training"])]
    if result.get("student"):
        runs.append(("student query encoder", "--student-minutes", result["student"]))
    for name, option, run in runs:
        if _cut_short(run):
            console.print(
                f"\n[bold yellow]partial run:[/] the {name} trained {_steps(run)} within its {option} cap of "
                f"{run['max_minutes']:g} min; every number above for it is of that partial run. Run without "
                f"{option} for the full, documented quality.",
                highlight=False,
            )


def _print_commands(result: dict[str, Any]) -> None:
    """The next commands, one line each (shell-quoted, never wrapped) so that they paste as they are."""
    paths = result["paths"]
    console.print(f"\ncontact sheet: {paths['contact_sheet']}", highlight=False, markup=False)
    if paths.get("calibration_plot"):
        console.print(f"calibration plot: {paths['calibration_plot']}", highlight=False, markup=False)
    index, encoder = shlex.quote(paths["index"]), shlex.quote(paths["query_encoder"])
    console.print("serve this index over HTTP with:")
    _print_command(f"retrieval serve --index {index} --query-encoder {encoder}")
    if result["samples"] and result.get("calibration"):
        query = shlex.quote(result["samples"][0]["query"])
        sheet = shlex.quote(str(Path(paths["work_dir"]) / "search.png"))
        console.print("search it from the shell, hits of the same shape only, with a contact sheet:")
        _print_command(
            f"retrieval search --index {index} --query-encoder {encoder} --granularity middle --sheet {sheet} {query}"
        )
    if "mobile_query_encoder" in paths:
        console.print("then search from the device side (the photo is embedded here, only the vector is sent):")
        _print_command(
            f"python examples/query_client.py --model {shlex.quote(paths['mobile_query_encoder'])} PHOTO.png"
        )


def _print_command(command: str) -> None:
    console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)


def _steps(run: dict[str, Any]) -> str:
    """``"600 steps"``, or ``"135 of 600 steps"`` for a run its minute cap cut short."""
    return f"{run['steps']} of {run['planned_steps']} steps" if _cut_short(run) else f"{run['steps']} steps"


def _cut_short(run: dict[str, Any]) -> bool:
    """Whether a training ran fewer steps than its recipe plans (only a --minutes cap does that here)."""
    planned = run.get("planned_steps")
    return planned is not None and run["steps"] < planned


def _partial_note(run: dict[str, Any]) -> str:
    return f" - PARTIAL RUN, {_steps(run)}" if _cut_short(run) else ""


def _print_student(teacher: dict[str, Any], student: dict[str, Any]) -> None:
    """Teacher on both sides beside student queries against the teacher's index, per level; the latency ratio."""
    from rich.table import Table

    evaluation = student["evaluation"]
    title = "Asymmetric search: the student's queries against the teacher's index (mAP / R@1)"
    table = Table(title=title + _partial_note(student))
    for column in ("level", "teacher (both sides)", "student -> teacher index", "student (both sides)"):
        table.add_column(column, justify="right" if column != "level" else "left")
    rows = [*teacher["per_level"].items(), ("mean", teacher["mean"])]
    for level, values in rows:
        cells = [_pair(values)]
        for mode in ("asymmetric", "symmetric"):
            report = evaluation[mode]
            cells.append(_pair(report["mean"] if level == "mean" else report["per_level"][level]))
        table.add_row(level, *cells)
    console.print(table)
    latency = student["latency"]
    ratio = evaluation["asymmetric"]["mean"]["mAP"] / teacher["mean"]["mAP"] if teacher["mean"]["mAP"] else 0.0
    console.print(
        f"student: {_steps(student)} in {student['seconds']:.0f}s; asymmetric mAP = {100 * ratio:.0f}% of the "
        f"teacher's; one query (ONNX, preprocessing included): student {latency['student_ms']:.1f} ms, teacher "
        f"{latency['teacher_ms']:.1f} ms (ratio {latency['ratio']:.2f})"
    )
    mobile = student["mobile"]
    console.print(
        f"mobile model (int8, uint8 input): {mobile['int8_bytes'] / 1e6:.2f} MB ({mobile['size_ratio']:.2f}x the "
        f"float32 one), {mobile['int8_ms']:.2f} ms vs {mobile['fp32_ms']:.2f} ms a query on one thread; agreement "
        f"with float32 on {mobile['agreement_images']} held-out images: mean cosine {mobile['mean_cosine']:.4f}, "
        f"top-{mobile['k']} overlap {mobile['top_k_overlap']:.2f}"
    )


def _pair(values: dict[str, Any]) -> str:
    return f"{_pct(values['mAP'])} / {_pct(values['R@1'])}"


def _pct(value: float | None) -> str:
    """A fraction as a percentage; ``None`` (a level where no query had a relevant item) as n/a."""
    return "n/a" if value is None else f"{100 * value:.1f}%"
