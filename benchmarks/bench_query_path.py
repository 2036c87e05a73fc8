"""The AML query path: the EfficientNet-B3 student (ONNX Runtime and PyTorch) against the GLAM-ResNet101 teacher.

Usage:
    python benchmarks/bench_query_path.py [--student-size 300] [--teacher-size 512] [--batches 1,32]
        [--repeats 3] [--threads 2] [--json]

Asymmetric metric learning embeds the gallery once with a big teacher and every query with a small student
trained into the teacher's space, so only the student sits on the query path. Target: the student's query
latency is at most 1/8 of the teacher's (ratio <= 0.125) at the same batch size and thread count.

Both encoders are built from random weights (``pretrained=False``; latency and FLOPs do not depend on the
values): the teacher is GLAM-ResNet101-GeM with a 512-d head at its serving resolution, the student is
EfficientNet-B3 -> GeM -> a linear projection to the teacher's 512 dimensions (the ``aml-effnetb3-glam``
recipe's student; ``--projection before_pooling`` for METHODS.md's 1x1 convolution before GeM), at
EfficientNet-B3's native 300 px. The student is saved and exported with ``serving.export.export_onnx`` into a
temporary directory (the export verifies its own parity with PyTorch).

What is timed: the model forward only, on pre-made normalised float32 tensors ``(B, 3, S, S)`` -- no image
decode, resize or normalisation, which cost the same for any encoder at a given size and are measured by
``bench_query_encoder.py``. All three runtimes use the same thread count (``torch.set_num_threads`` and ONNX
Runtime's ``intra_op_num_threads``). For each batch size every runtime gets one warm-up forward, then each
repeat times one forward of each, in an order rotated every repeat so that a load change on the machine hits
all three; the table reports the median. FLOPs are counted for one image at each model's own resolution
with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, 2 FLOPs per
multiply-add; element-wise ops are not counted). The header prints the platform, CPU count and threads:
the numbers belong to that machine and its load at that time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

TARGET_RATIO = 1 / 8
EMBEDDING_DIM = 512
TEACHER = "teacher torch"
STUDENT_TORCH = "student torch"
STUDENT_ONNX = "student onnx"


def _teacher(size: int) -> torch.nn.Module:
    from models import Encoder, EncoderConfig
    from retrieval.data.transforms import PreprocessConfig

    config = EncoderConfig(
        backbone="resnet101",
        attention="glam",
        embedding_dim=EMBEDDING_DIM,
        preprocess=PreprocessConfig(input_size=size),
    )
    return Encoder(config).eval()


def _student(size: int, projection: str = "after_pooling") -> torch.nn.Module:
    from models import Encoder, EncoderConfig
    from retrieval.data.transforms import PreprocessConfig

    config = EncoderConfig(
        backbone="efficientnet_b3",
        projection=projection,
        embedding_dim=EMBEDDING_DIM,
        pooling="gem",
        preprocess=PreprocessConfig(input_size=size),
        teacher_id="random-glam-resnet101",
    )
    return Encoder(config).eval()


def _export(student: torch.nn.Module, workdir: Path) -> Any:
    """Save the student (export needs its encoder id) and export it; returns the verified ``OnnxExport``."""
    from models import save_encoder
    from serving.export import export_onnx

    save_encoder(student, workdir / "student")
    return export_onnx(student, workdir / "student.onnx")


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _flops(model: torch.nn.Module, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def _seconds(forward: Callable[[], object]) -> float:
    start = time.perf_counter()
    forward()
    return time.perf_counter() - start


def _runners(models: dict[str, torch.nn.Module], session: Any, batch: int, sizes: dict[str, int]) -> dict:
    """One zero-argument forward per runtime, each on its own pre-made seeded batch at its own resolution."""
    generator = torch.Generator().manual_seed(batch)
    student_images = torch.randn(batch, 3, sizes["student"], sizes["student"], generator=generator)
    teacher_images = torch.randn(batch, 3, sizes["teacher"], sizes["teacher"], generator=generator)
    student_array = np.ascontiguousarray(student_images.numpy())
    input_name = session.get_inputs()[0].name
    return {
        STUDENT_ONNX: lambda: session.run(None, {input_name: student_array}),
        STUDENT_TORCH: lambda: models[STUDENT_TORCH](student_images),
        TEACHER: lambda: models[TEACHER](teacher_images),
    }


def _median_ms(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            runners[name]()  # warm-up: first-call allocations, kernel selection, ORT arena growth
        for rep in range(repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                times[name].append(_seconds(runners[name]))
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def _rows(batch: int, ms: dict[str, float], flops: dict[str, int]) -> list[dict[str, Any]]:
    """Result rows of one batch size; ratios are student / teacher at the same batch, thread count and load."""
    rows = []
    for name, value in ms.items():
        ratio = value / ms[TEACHER]
        rows.append(
            {
                "batch": batch,
                "model": name,
                "ms": value,
                "images_per_s": 1e3 * batch / value,
                "latency_ratio": ratio,
                "flops_ratio": flops[TEACHER if name == TEACHER else STUDENT_TORCH] / flops[TEACHER],
                "meets_target": None if name == TEACHER else ratio <= TARGET_RATIO,
            }
        )
    return rows


def _header(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "repeats": args.repeats,
        "student_size": args.student_size,
        "projection": args.projection,
        "teacher_size": args.teacher_size,
        "target_ratio": TARGET_RATIO,
    }


def _print_table(report: dict[str, Any]) -> None:
    head, models = report["machine"], report["models"]
    print(
        f"{head['platform']} ({head['processor']}), {head['cpu_count']} CPU(s), {head['cpus_available']} available, "
        f"{head['threads']} thread(s); torch {head['torch']}, onnxruntime {head['onnxruntime']}"
    )
    print(
        f"model forward only on pre-made float32 tensors (no decode/preprocessing), median of {head['repeats']} "
        "interleaved repeats after 1 warm-up"
    )
    print(
        f"student efficientnet_b3 (projection {head['projection']}) at {head['student_size']} px; "
        f"teacher GLAM-resnet101-GeM at {head['teacher_size']} px; {EMBEDDING_DIM}-d; "
        f"ONNX export parity cosine {report['export']['min_cosine']:.6f} ({report['export']['exporter']})"
    )
    print(
        f"target: the student's query latency at most 1/8 of the teacher's (latency ratio = student / teacher "
        f"at the same batch <= {TARGET_RATIO:.3f})"
    )
    print()
    print(f"{'model':<14} {'px':>4} {'params (M)':>11} {'GFLOPs/img':>11} {'FLOPs ratio':>12}")
    teacher_flops = models[TEACHER]["flops"]
    for name in (STUDENT_ONNX, STUDENT_TORCH, TEACHER):
        model = models[name]
        ratio = model["flops"] / teacher_flops
        print(
            f"{name:<14} {model['size']:>4} {model['params'] / 1e6:>11.2f} {model['flops'] / 1e9:>11.2f} {ratio:>12.4f}"
        )
    print()
    print(
        f"{'batch':>5} {'model':<14} {'ms/batch':>10} {'images/s':>9} {'latency ratio':>14} {'FLOPs ratio':>12} target"
    )
    for row in report["results"]:
        met = {None: "-", True: "met", False: "MISSED"}[row["meets_target"]]
        print(
            f"{row['batch']:>5} {row['model']:<14} {row['ms']:>10.1f} {row['images_per_s']:>9.1f} "
            f"{row['latency_ratio']:>14.4f} {row['flops_ratio']:>12.4f} {met}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-size", type=int, default=300, help="student input side (EfficientNet-B3: 300)")
    parser.add_argument("--teacher-size", type=int, default=512, help="teacher input side (serving resolution)")
    parser.add_argument(
        "--projection", default="after_pooling", choices=["after_pooling", "before_pooling"], help="student head"
    )
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per runtime and batch (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.repeats < 1 or any(b < 1 for b in batches):
        parser.error("--repeats and every batch size must be at least 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = {"student": args.student_size, "teacher": args.teacher_size}
    models = {STUDENT_TORCH: _student(args.student_size, args.projection), TEACHER: _teacher(args.teacher_size)}
    flops = {name: _flops(model, sizes["teacher" if name == TEACHER else "student"]) for name, model in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        export = _export(models[STUDENT_TORCH], Path(tmp))
        session = _ort_session(export.path, args.threads)
        results = [
            row
            for batch in batches
            for row in _rows(batch, _median_ms(_runners(models, session, batch, sizes), args.repeats), flops)
        ]

    student = {"params": _count(models[STUDENT_TORCH]), "flops": flops[STUDENT_TORCH], "size": args.student_size}
    report = {
        "machine": _header(args),
        "export": {"min_cosine": export.min_cosine, "exporter": export.exporter},
        "models": {
            STUDENT_ONNX: student,
            STUDENT_TORCH: student,
            TEACHER: {"params": _count(models[TEACHER]), "flops": flops[TEACHER], "size": args.teacher_size},
        },
        "results": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)


if __name__ == "__main__":
    main()
