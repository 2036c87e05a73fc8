"""The quickstart pipeline: synthetic gallery -> train -> index -> calibrate -> evaluate -> distil -> export -> search.

The gallery encoder (teacher) is trained, indexes the test gallery, calibrates the index's granularity
thresholds on the labelled validation split (so the served index answers ``granularity`` searches) and is
scored on the gallery; then a small student query encoder is distilled into the teacher's space (Asymmetric
Metric Learning), scored on the same gallery with its queries searching the teacher's vectors, exported to
ONNX, timed against the teacher's ONNX export, and used for the sample searches: the asymmetric query path
end to end.

The work is budgeted in steps, not minutes: by default both trainings run their recipe's full step count
whatever the machine's speed, so the quickstart reaches the same quality on a slow or busy machine, only
later. ``minutes``/``student_minutes`` are optional caps; a run they cut short says so in its result.

Kept apart from the typer command so that tests (and notebooks) can run it as a function
and inspect its result. It sits in the CLI layer because it is the one place that joins
every stage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["QuickstartOptions", "QuickstartResult", "run_quickstart"]

logger = logging.getLogger(__name__)


@dataclass
class QuickstartOptions:
    """What the quickstart runs; every field has a default that works on a 2-core laptop.

    ``minutes`` and ``student_minutes`` cap the two trainings' wall time (``schedule.max_minutes``); ``None``
    (the default) lifts the recipes' own caps, so the full step count is trained on any machine.
    """

    work_dir: Path = Path("quickstart-run")
    minutes: float | None = None
    seed: int = 0
    recipe: str = "quickstart"
    overrides: Sequence[str] = ()
    student_recipe: str = "aml-synthetic-cpu"
    student_minutes: float | None = None
    student_overrides: Sequence[str] = ()
    distill: bool = True
    num_queries: int = 4
    top_k: int = 5
    device: str = "cpu"
    progress: bool = True


@dataclass
class QuickstartResult:
    """Everything the quickstart produced and measured."""

    metrics: dict[str, Any]
    chance: dict[str, Any]
    training: dict[str, Any]
    samples: list[dict[str, Any]]
    paths: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    student: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "chance": self.chance,
            "training": self.training,
            "student": self.student,
            "calibration": self.calibration,
            "samples": self.samples,
            "paths": self.paths,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        }


Step = Callable[[str], None]


def run_quickstart(options: QuickstartOptions, announce: Step = lambda message: None) -> QuickstartResult:
    """Run the whole engine once on the synthetic hierarchical dataset and return what it measured."""
    from retrieval.config import load_config
    from training.config import TrainConfig
    from training.recipe_paths import find_recipe

    work = options.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"out_dir={work / 'train'}",
        f"seed={options.seed}",
        f"data.synthetic.seed={options.seed}",
        _minutes_cap(options.minutes),
        f"device={options.device}",
        *options.overrides,
    ]
    config = load_config(TrainConfig, find_recipe(options.recipe), overrides)
    timings: dict[str, float] = {}

    steps = 9 if options.distill else 7
    announce(f"1/{steps} generating the synthetic hierarchical gallery and its labelled validation images")
    with _timed(timings, "data"):
        test_csv, val_csv = _write_dataset(config, work / "data")

    announce(f"2/{steps} training the gallery encoder ({config.model.backbone}) for {_budget(config)}")
    with _timed(timings, "train"):
        training = _train(config, options.progress)
    encoder_path = Path(training["encoder_path"])

    announce(f"3/{steps} indexing the test gallery (open-set: its fine classes were never trained on)")
    with _timed(timings, "index"):
        index_path, gallery = _index(encoder_path, test_csv, work / "index", options)

    announce(f"4/{steps} calibrating the index's granularity thresholds on the labelled validation images")
    with _timed(timings, "calibrate"):
        calibration = _calibrate(index_path, val_csv, options)

    announce(f"5/{steps} evaluating per level (each test image queries all the others)")
    with _timed(timings, "evaluate"):
        metrics, chance, gallery_vectors = _evaluate(index_path, gallery, options.seed)

    announce(f"6/{steps} exporting the gallery encoder to ONNX")
    with _timed(timings, "export"):
        onnx_path, cosine = _export(encoder_path, work / "query_encoder.onnx")
    query_encoder = onnx_path

    student: dict[str, Any] | None = None
    if options.distill:
        announce(f"7/{steps} distilling a small query encoder into the gallery encoder's space (AML)")
        with _timed(timings, "distill"):
            student = _distill(encoder_path, config.data, work / "student", options)
        announce(
            f"8/{steps} scoring the student's queries against the teacher's index, re-calibrating its thresholds "
            "for the student's queries, exporting and timing it"
        )
        with _timed(timings, "student"):
            student_path = Path(student["encoder_path"])
            student["evaluation"] = _evaluate_student(student_path, gallery, gallery_vectors, options)
            student["teacher_calibration"] = calibration  # what the index encoder's own queries would get
            calibration = _calibrate(index_path, val_csv, options, query_encoder=student_path)
            query_encoder, student["onnx_min_cosine"] = _export(student_path, work / "student.onnx")
            student["latency"] = _latency(query_encoder, onnx_path, gallery)
            student["mobile"] = _export_mobile(student_path, test_csv, work / "student-mobile.onnx")

    announce(f"{steps}/{steps} searching with the ONNX query encoder and writing the contact sheet")
    with _timed(timings, "search"):
        samples = _sample_searches(index_path, query_encoder, gallery, options, work / "contact_sheet.png")

    paths = {
        **({"mobile_query_encoder": student["mobile"]["ort_path"]} if student else {}),
        "work_dir": str(work),
        "encoder": str(encoder_path),
        "index": str(index_path),
        "gallery_encoder_onnx": str(onnx_path),
        "query_encoder": str(query_encoder),
        "contact_sheet": str(work / "contact_sheet.png"),
        "test_csv": str(test_csv),
        "val_csv": str(val_csv),
        **({"calibration_plot": calibration["plot"]} if calibration.get("plot") else {}),
    }
    training["onnx_min_cosine"] = cosine
    return QuickstartResult(metrics, chance, training, samples, paths, timings, student, calibration)


def _minutes_cap(minutes: float | None) -> str:
    """The ``schedule.max_minutes`` override: the cap when one is given, else none at all (``null`` lifts the
    recipe's own cap, so the full step count is trained however slow the machine)."""
    return f"schedule.max_minutes={'null' if minutes is None else minutes}"


def _budget(config: Any) -> str:
    steps = f"{config.schedule.max_steps} steps"
    cap = config.schedule.max_minutes
    return steps if cap is None else f"{steps} (at most {cap:g} min)"


def _partial(result: dict[str, Any], config: Any) -> dict[str, Any]:
    """``result`` (whose ``planned_steps`` lets a run its minute cap cut short say "n of N steps") with the cap."""
    return {**result, "max_minutes": config.schedule.max_minutes}


class _timed:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.start


def _write_dataset(config: Any, out: Path) -> tuple[Path, Path]:
    """Write the test split (the gallery) and the val split (labelled images that calibrate the index's
    thresholds) as files; the trainer renders train and val in memory."""
    from retrieval.data.synthetic import write_synthetic

    written = write_synthetic(config.data.synthetic, out, overwrite=True, splits=["test", "val"])
    return Path(written["test"]), Path(written["val"])


def _train(config: Any, progress: bool) -> dict[str, Any]:
    from training.trainer import train

    return _partial(train(config, resume=False, progress=progress).to_dict(), config)


def _calibrate(
    index_path: Path, val_csv: Path, options: QuickstartOptions, query_encoder: Path | None = None
) -> dict[str, Any]:
    """Calibrate the index's per-level thresholds on the validation images (fresh instances of the training
    classes) and store them in its manifest, so that the served index answers ``granularity`` searches and tags
    every hit with its level. With ``query_encoder`` (the student the server will use) the queries are the
    student's embeddings against the index encoder's: the pairs the served index will see."""
    from indexing.calibrate_index import calibrate_index

    result = calibrate_index(
        index_path, val_csv, query_encoder_path=query_encoder, device=options.device, progress=options.progress
    )
    calibration = result.calibration
    warnings = getattr(result, "warnings", None) or getattr(calibration, "warnings", None) or ()
    plot = getattr(result, "plot", None)  # calibration.png, where calibrate_index writes one
    return {
        "images": result.images,
        "queries_by": "index encoder" if query_encoder is None else "student",
        "objective": calibration.objective,
        "thresholds": calibration.thresholds,
        "levels": [entry.to_dict() for entry in calibration.levels],
        "warnings": [getattr(warning, "message", str(warning)) for warning in warnings],
        "plot": str(plot) if isinstance(plot, str | Path) else None,
    }


def _index(encoder_path: Path, test_csv: Path, out: Path, options: QuickstartOptions) -> tuple[Path, Any]:
    from indexing.builder import build_index
    from retrieval.data.datasets import open_dataset

    gallery = open_dataset(test_csv)
    build_index(encoder_path, gallery, out, device=options.device, progress=options.progress)
    return out, gallery


def _evaluate(index_path: Path, gallery: Any, seed: int) -> tuple[dict[str, Any], dict[str, Any], np.ndarray]:
    """Per-level metrics from the vectors in the index, the same metrics for random vectors (chance), and the
    index's vectors in gallery order (the teacher side of the student's asymmetric evaluation)."""
    from indexing.index_dir import open_index_dir
    from retrieval.evaluation.protocols import evaluate_chance, evaluate_embeddings

    with open_index_dir(index_path) as index:
        ids, vectors = index.index.reconstruct_all()
    labels = gallery.labels[ids]
    report = evaluate_embeddings(vectors, labels, schema=gallery.schema)
    chance = evaluate_chance(labels, vectors.shape[1], schema=gallery.schema, seed=seed)
    in_gallery_order = np.zeros((len(gallery), vectors.shape[1]), np.float32)
    in_gallery_order[ids] = vectors
    return report.to_dict(), chance.to_dict(), in_gallery_order


def _distill(teacher_path: Path, data: Any, out: Path, options: QuickstartOptions) -> dict[str, Any]:
    """Distil the student recipe into the teacher's space within ``student_minutes``, on the teacher's training
    data (``data``, the teacher run's resolved data section)."""
    from retrieval.config import load_config
    from training.config import DistillConfig
    from training.recipe_paths import find_recipe
    from training.trainer import train

    overrides = [
        f"out_dir={out}",
        f"distill.teacher={teacher_path}",
        f"seed={options.seed + 1}",  # not the teacher's: a student of its architecture would start from its weights
        f"data.synthetic.seed={options.seed}",
        _minutes_cap(options.student_minutes),
        f"device={options.device}",
        *options.student_overrides,
    ]
    config = load_config(DistillConfig, find_recipe(options.student_recipe), overrides)
    config = config.model_copy(update={"data": data})
    return _partial(train(config, resume=False, progress=options.progress).to_dict(), config)


def _evaluate_student(
    student_path: Path, gallery: Any, teacher_vectors: np.ndarray, options: QuickstartOptions
) -> dict[str, Any]:
    """The student's queries against the teacher's gallery vectors (each image querying all the others), and
    the student on both sides, per level."""
    from indexing.extract import extract_embeddings
    from models.checkpoint import load_encoder
    from retrieval.evaluation.asymmetric import evaluate_asymmetric

    student = load_encoder(student_path, device=options.device)
    extraction = extract_embeddings(student, gallery, device=options.device, progress=False)
    rows = extraction.indices
    reports = evaluate_asymmetric(
        extraction.embeddings, teacher_vectors[rows], gallery.labels[rows], schema=gallery.schema, include_teacher=False
    )
    return {mode: report.to_dict() for mode, report in reports.items()}


def _latency(student_onnx: Path, teacher_onnx: Path, gallery: Any, repeats: int = 15) -> dict[str, float]:
    """Median time to embed one query image (preprocessing + network) with each ONNX model, interleaved."""
    from serving.runtimes import open_query_encoder

    student = open_query_encoder(student_onnx)
    teacher = open_query_encoder(teacher_onnx)
    images = [gallery.load_image(i) for i in range(repeats)]
    times: dict[str, list[float]] = {"student_ms": [], "teacher_ms": []}
    for runtime in (student, teacher):  # warm-up
        runtime.encode(images[:1])
    for image in images:
        for key, runtime in (("student_ms", student), ("teacher_ms", teacher)):
            start = time.perf_counter()
            runtime.encode([image])
            times[key].append(1000 * (time.perf_counter() - start))
    medians = {key: float(np.median(values)) for key, values in times.items()}
    return {**medians, "ratio": medians["student_ms"] / medians["teacher_ms"]}


def _export_mobile(student_path: Path, images_csv: Path, out: Path) -> dict[str, Any]:
    """The student as the phone's int8 model, calibrated on 64 gallery images and checked on 64 others."""
    from serving.export_mobile import export_onnx_mobile

    exported = export_onnx_mobile(student_path, out, images_csv, calibration_count=64, agreement_count=64)
    return exported.as_dict()


def _export(encoder_path: Path, out: Path) -> tuple[Path, float]:
    from serving.export import export_onnx

    exported = export_onnx(encoder_path, out)
    return exported.path, exported.min_cosine


def _pick_queries(gallery: Any, count: int, seed: int) -> list[int]:
    """One query per coarse class (in order), so the sample searches show every family."""
    coarse = gallery.labels[:, -1]
    rng = np.random.default_rng(seed)
    picks = [int(rng.choice(np.flatnonzero(coarse == c))) for c in np.unique(coarse)]
    return picks[:count]


def _sample_searches(
    index_path: Path, onnx_path: Path, gallery: Any, options: QuickstartOptions, sheet_path: Path
) -> list[dict[str, Any]]:
    from serving.contact_sheet import render_contact_sheet
    from serving.engine import SearchEngine

    picks = _pick_queries(gallery, options.num_queries, options.seed)
    images = [gallery.load_image(i) for i in picks]
    with SearchEngine.open(index_path, onnx_path) as engine:
        raw = engine.search(images, k=options.top_k + 1)
        calibrated = list(engine.thresholds)
    results = [r.without_ids({i}).top(options.top_k) for r, i in zip(raw, picks, strict=True)]
    samples = [
        {"query": gallery.names[i], "labels": gallery.label_names(i), **r.to_dict()}
        for i, r in zip(picks, results, strict=True)
    ]

    def resolve(hit: Any) -> Any:
        return gallery.load_image(int(hit.id))

    queries = [(img, gallery.label_names(i)) for img, i in zip(images, picks, strict=True)]
    names = ["/".join(Path(gallery.names[i]).parts[-2:]) for i in picks]  # <class>/<file>; the full path is printed
    render_contact_sheet(queries, results, resolve, sheet_path, calibrated_levels=calibrated, query_names=names)
    return samples
