"""AML distillation losses side by side: a small student's asymmetric and symmetric mAP next to its teacher's.

Usage:
    python experiments/aml_distillation.py [--datasets synthetic,clothing] [--seeds 0,1,2] [--steps 300]
        [--methods all] [--out docs/experiments] [--threads 2]

Per dataset, one teacher is trained once (seed 0) with the ``quickstart`` recipe (resnet10t from scratch, 64 px,
128-d, multi-scale normalised softmax), then every method trains the same student architecture (``--student``,
at ``--student-size`` px) for the same number of steps (the fixed CPU budget), per seed:

* ``alone``: the student trained as a metric encoder on its own (the teacher's loss and labels, no teacher):
  the symmetric baseline, whose space has nothing to do with the teacher's;
* ``reg``, ``contr``, ``contr+``, ``triplet``: AML's asymmetric losses (Reg, Contr, Contr+, asymmetric triplet),
  tuples mined in the teacher's space (5 hardest negatives, one per class, own class skipped);
* ``rkd``, ``darkrank``: the symmetric-distillation baselines (relations within the batch).

Student seeds start at 1: a student of the teacher's architecture with the teacher's seed would start from
the teacher's very initial weights and, trained alone, land in a space close to the teacher's (measured: 71.7
asymmetric mAP for ``alone`` at seed 0 on the synthetic set, against the teacher's 85.2).

Scored on held-out images, every image querying all the others: *asymmetric* = student queries against the
teacher's gallery vectors (the deployed pairing), *symmetric* = student on both sides, beside the teacher on
both sides. Datasets: the synthetic hierarchical set (train split -> open-set test split) and clothing-small
(real photos; ``validation`` split -> ``test`` split; skipped when ``../shared/data/clothing-small`` is absent).
Writes ``aml-<dataset>.json`` (every run) and ``aml-<dataset>.md`` (mean +- std over seeds) per dataset, so the
datasets can also run as separate processes (``--datasets synthetic`` and ``--datasets clothing``, one thread
each, use a 2-core machine better than one process with two threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "alone": {"name": "multiscale_normsoftmax", "params": {"scale": 16.0}},
    "reg": {"name": "aml_regression", "params": {}},
    "contr": {"name": "aml_contrastive", "params": {"margin": 0.7}},
    "contr+": {"name": "aml_contrastive_plus", "params": {"margin": 0.7}},
    "triplet": {"name": "aml_triplet", "params": {"margin": 0.1}},
    "rkd": {"name": "rkd", "params": {}},
    "darkrank": {"name": "darkrank", "params": {}},
}
CLOTHING = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing-small"


def _datasets(name: str) -> tuple[Any, Any, list[str]]:
    """``(train, test, teacher recipe overrides)`` of one dataset."""
    from retrieval.config import load_config
    from retrieval.data.datasets import open_dataset
    from retrieval.data.synthetic import generate_split
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path

    if name == "synthetic":
        synthetic = load_config(TrainConfig, recipe_path("quickstart")).data.synthetic
        return generate_split(synthetic, "train"), generate_split(synthetic, "test"), []
    labels = CLOTHING / "labels.csv"
    train, test = open_dataset(labels, split="validation"), open_dataset(labels, split="test")
    overrides = [
        "data.source=csv",
        f"data.train_csv={labels}",
        "sampler.classes_per_batch=8",  # 10 fine classes
        "sampler.images_per_class=8",
        "eval_every=0",
    ]
    return train, test, overrides


def _teacher(name: str, train: Any, overrides: list[str], steps: int, workdir: Path) -> Path:
    from retrieval.config import load_config
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path
    from training.trainer import Trainer

    out = workdir / name / "teacher"
    if (out / "encoder" / "config.json").is_file():
        return out / "encoder"
    config = load_config(
        TrainConfig,
        recipe_path("quickstart"),
        [*overrides, f"schedule.max_steps={steps}", "schedule.max_minutes=null", "checkpoint_every=0", "device=cpu"],
    )
    return Trainer(config, train, None, out_dir=out, progress=False).fit(resume=False).encoder_path


def _config(method: str, teacher: Path, seed: int, args: argparse.Namespace, overrides: list[str]) -> Any:
    from retrieval.config import load_config
    from training.config import DistillConfig, TrainConfig
    from training.recipe_paths import recipe_path

    student = [
        f"model.backbone={args.student}",
        f"model.preprocess.input_size={args.student_size}",
        f"schedule.max_steps={args.steps}",
        "schedule.max_minutes=null",
        "checkpoint_every=0",
        "eval_every=0",
        f"seed={seed}",
        "device=cpu",
        *[o for o in overrides if o.startswith("sampler.")],
    ]
    loss = METHODS[method]
    if method == "alone":  # the teacher's recipe and loss on the student's architecture, at the teacher's dimension
        config = load_config(TrainConfig, recipe_path("quickstart"), [*overrides, *student])
    else:
        config = load_config(DistillConfig, recipe_path("aml-synthetic-cpu"), [*student, f"distill.teacher={teacher}"])
    return config.model_copy(update={"loss": config.loss.model_copy(update=loss)})


def _run(method: str, seed: int, dataset: str, data: tuple[Any, Any, list[str]], teacher: Path, args: Any) -> dict:
    from models.checkpoint import load_encoder
    from retrieval.evaluation.asymmetric import evaluate_asymmetric
    from training.trainer import Trainer

    train, test, overrides = data
    config = _config(method, teacher, seed, args, overrides)
    out = args.workdir / dataset / f"{method}-seed{seed}"
    trainer = Trainer(config, train, None, out_dir=out, progress=False)
    started = time.perf_counter()
    result = trainer.fit(resume=False)
    seconds = time.perf_counter() - started
    teacher_encoder = load_encoder(teacher)
    student = trainer.embed(test)
    teacher_vectors = trainer.embed(test, teacher_encoder)
    reports = evaluate_asymmetric(student, teacher_vectors, test.labels, schema=test.schema)
    return {
        "dataset": dataset,
        "method": method,
        "loss": config.loss.name,
        "seed": seed,
        "steps": result.steps,
        "seconds_per_step": seconds / max(result.steps_this_run, 1),
        **{mode: {"per_level": r.per_level, "mean": r.mean} for mode, r in reports.items()},
    }


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _table(runs: list[dict[str, Any]], dataset: str) -> list[str]:
    chosen = [r for r in runs if r["dataset"] == dataset]
    levels = list(chosen[0]["asymmetric"]["per_level"])
    columns = [f"asym {level}" for level in levels] + ["asym mean", "sym mean"]
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    teacher = [r["teacher"] for r in chosen]
    cells = [_mean_std([t["per_level"][level]["mAP"] for t in teacher]) for level in levels]
    mean = _mean_std([t["mean"]["mAP"] for t in teacher])
    lines.append("| teacher (both sides) | " + " | ".join([*cells, mean, mean]) + " |")
    for method in dict.fromkeys(r["method"] for r in chosen):
        rows = [r for r in chosen if r["method"] == method]
        cells = [_mean_std([r["asymmetric"]["per_level"][level]["mAP"] for r in rows]) for level in levels]
        cells += [_mean_std([r["asymmetric"]["mean"]["mAP"] for r in rows])]
        cells += [_mean_std([r["symmetric"]["mean"]["mAP"] for r in rows])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _markdown(runs: list[dict[str, Any]], meta: dict[str, Any], command: str) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "# AML: distillation losses for an asymmetric query encoder",
        "",
        f"Student: timm `{meta['student']}` at {meta['student_size']} px, GeM, linear projection to the teacher's",
        f"128 dimensions, L2; {meta['steps']} steps of 16 x 4 images per run (fixed budget), seeds"
        f" {', '.join(map(str, seeds))}. Teacher: the `quickstart` recipe (resnet10t at 64 px, {meta['teacher_steps']}"
        " steps), trained once per dataset.",
        f"Student/teacher FLOPs per image: {meta['flops_ratio']:.3f}. mAP in % over held-out images, every image",
        "querying all the others (mean ± std over seeds): *asym* = student queries against the teacher's vectors,",
        "*sym* = student on both sides. The teacher row repeats its symmetric mAP in both columns.",
        f"Median CPU time per student step: {meta['seconds_per_step']:.2f} s (2-core machine, shared).",
        "",
        "Regenerate with:",
        "",
        f"    {command}",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        lines += [f"## {dataset}", "", *_table(runs, dataset), ""]
    return "\n".join(lines)


def _flops_ratio(student: str, student_size: int) -> float:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def flops(name: str, size: int) -> int:
        model = timm.create_model(name, num_classes=0, global_pool="").eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.forward_features(torch.zeros(1, 3, size, size))
        return counter.get_total_flops()

    return flops(student, student_size) / flops("resnet10t", 64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,clothing", help="comma-separated: synthetic, clothing")
    parser.add_argument("--steps", type=int, default=300, help="student steps per run (the fixed budget)")
    parser.add_argument("--teacher-steps", type=int, default=600, help="teacher steps (once per dataset)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated student seeds (the teachers use seed 0)")
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--student", default="resnet10t", help="timm backbone of the student")
    parser.add_argument("--student-size", type=int, default=32, help="the student's input size")
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments/aml"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    datasets = args.datasets.split(",")
    if "clothing" in datasets and not (CLOTHING / "labels.csv").is_file():
        print(f"skipping clothing: {CLOTHING} is absent", file=sys.stderr)
        datasets.remove("clothing")
    command = "python experiments/aml_distillation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for dataset in datasets:
        runs = []
        data = _datasets(dataset)
        teacher = _teacher(dataset, data[0], data[2], args.teacher_steps, args.workdir)
        print(f"{dataset}: train {len(data[0])}, test {len(data[1])}; teacher {teacher}", file=sys.stderr)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method in methods:
                run = _run(method, seed, dataset, data, teacher, args)
                runs.append(run)
                print(
                    f"{dataset} {method:>9} seed {seed}: asym {100 * run['asymmetric']['mean']['mAP']:.1f} "
                    f"sym {100 * run['symmetric']['mean']['mAP']:.1f} teacher {100 * run['teacher']['mean']['mAP']:.1f}"
                    f" ({run['seconds_per_step']:.2f} s/step)",
                    file=sys.stderr,
                )
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"aml-{dataset}.json").write_text(json.dumps(runs, indent=2) + "\n")
        meta = {
            "student": args.student,
            "student_size": args.student_size,
            "steps": args.steps,
            "teacher_steps": args.teacher_steps,
            "flops_ratio": _flops_ratio(args.student, args.student_size),
            "seconds_per_step": statistics.median(r["seconds_per_step"] for r in runs),
        }
        table = _markdown(runs, meta, command.strip())
        (args.out / f"aml-{dataset}.md").write_text(table + "\n")
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
