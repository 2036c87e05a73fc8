"""``retrieval quickstart``: the whole engine end to end on the built-in synthetic gallery."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from retrieval.cli.common import console, err_console, print_json, user_errors


def quickstart(
    work_dir: Path = typer.Option(Path("quickstart-run"), "--work-dir", help="Where every artifact is written."),
    minutes: float = typer.Option(5.0, "--minutes", min=0.05, help="Gallery-encoder training budget in minutes."),
    student_minutes: float = typer.Option(
        1.5, "--student-minutes", min=0.05, help="Budget for distilling the student query encoder, in minutes."
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
    texture, open-set test classes) -> train the gallery encoder on CPU within --minutes ->
    index the test gallery -> per-level Recall@1 / mAP against chance -> distil a small
    student query encoder into its space within --student-minutes (Asymmetric Metric
    Learning) -> score the student's queries against the teacher's index -> export both to
    ONNX and time one query each -> sample searches with the student -> contact sheet PNG ->
    the `retrieval serve` command.
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
    table = Table(title="Open-set retrieval on the synthetic test gallery (each image queries all others)")
    for column in ("level", "R@1", "chance R@1", "mAP", "chance mAP"):
        table.add_column(column, justify="right" if column != "level" else "left")
    for level, values in [*metrics["per_level"].items(), ("mean", metrics["mean"])]:
        ref = chance["per_level"].get(level, chance["mean"]) if level != "mean" else chance["mean"]
        table.add_row(level, _pct(values["R@1"]), _pct(ref["R@1"]), _pct(values["mAP"]), _pct(ref["mAP"]))
    console.print(table)
    console.print(
        f"trained {training['steps']} steps in {training['seconds']:.0f}s "
        f"({training.get('images_per_second', 0):.0f} img/s); "
        f"ONNX vs PyTorch min cosine {training['onnx_min_cosine']:.6f}"
    )
    if result.get("student"):
        _print_student(result["metrics"], result["student"])
    for sample in result["samples"]:
        query = sample["labels"]
        console.print(f"\n[bold]query[/] {sample['query']}  ({' / '.join(query.values())})", highlight=False)
        for rank, hit in enumerate(sample["hits"], start=1):
            same = [lvl for lvl, name in hit["labels"].items() if query.get(lvl) == name]
            tag = f"same {same[0]}" if same else "different"
            console.print(f"  {rank}. {hit['score']:.3f}  {hit['labels'].get('fine', '?'):<28} {tag}", highlight=False)
    paths = result["paths"]
    console.print(f"\ncontact sheet: {paths['contact_sheet']}")
    console.print("serve this index over HTTP with:")
    console.print(
        f"  retrieval serve --index {paths['index']} --query-encoder {paths['query_encoder']}", highlight=False
    )
    if "mobile_query_encoder" in paths:
        console.print("then search from the device side (the photo is embedded here, only the vector is sent):")
        console.print(
            f"  python examples/query_client.py --model {paths['mobile_query_encoder']} PHOTO.png", highlight=False
        )


def _print_student(teacher: dict[str, Any], student: dict[str, Any]) -> None:
    """Teacher on both sides beside student queries against the teacher's index, per level; the latency ratio."""
    from rich.table import Table

    evaluation = student["evaluation"]
    table = Table(title="Asymmetric search: the student's queries against the teacher's index (mAP / R@1)")
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
        f"student: {student['steps']} steps in {student['seconds']:.0f}s; asymmetric mAP = {100 * ratio:.0f}% of the "
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
