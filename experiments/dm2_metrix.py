"""DM² mutual learning and Metrix mixup against plain training, on a fixed CPU budget, several seeds.

Usage:
    python experiments/dm2_metrix.py [--datasets synthetic,clothing] [--parts dm2,metrix] [--seeds 0,1,2]
        [--steps 150] [--size 48] [--threads 1] [--out docs/experiments] [--workdir runs/experiments/dm2-metrix]

Every run trains the ``quickstart`` architecture (timm ``resnet10t`` from scratch, GeM, 128-d) for the same number
of optimiser steps per model (the fixed budget: a cohort of L models costs about L times one model), then embeds
the held-out test split and scores it with every image querying all the others: R@1 and mAP per label level.

* ``dm2``: the base loss is the triplet loss with distance-weighted sampling (the DM² paper's setting), summed over
  the label levels. ``independent`` is a cohort with the relation loss off (``mutual.weight 0``): the same models
  on the same batches, learning alone; ``MD`` adds the relation loss with model diversity (own initial weights),
  ``TD`` temporal diversity (model l steps with probability 2^-(l-1)), ``VD`` view diversity (own augmentation).
  Cohorts of 2 and 4; *single* is the mean over the cohort's models, *ensemble* their concatenation. The
  independent cohort of 2 is the first two models of the independent cohort of 4.
* ``metrix``: each base loss (contrastive, multi-similarity, proxy anchor, ProxyNCA++) alone and with Metrix mixup
  of the inputs, the feature maps or the embeddings (Beta(2, 2), mixed-loss weight 0.4).

Datasets: the synthetic hierarchical set (train split -> open-set test split; 3 levels) and clothing-small (real
photos; ``validation`` split -> ``test`` split; 2 levels; skipped when ``../shared/data/clothing-small`` is absent;
its photos are decoded once and held in memory at 128 px on the long side).

Each run's result is kept in ``--workdir/results`` (an interrupted sweep resumes where it stopped), and every
invocation rewrites ``dm2-<dataset>.md`` / ``metrix-<dataset>.md`` and ``dm2-metrix.json`` in ``--out`` from all the
results found there. Datasets can run as separate processes (one ``--threads 1`` process per core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CLOTHING = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing-small"
RECIPE = "quickstart"
COHORTS = (2, 4)
DM2_VARIANTS: dict[str, dict[str, Any]] = {
    "independent": {"weight": 0.0, "temporal_diversity": False, "view_diversity": False},
    "MD": {"temporal_diversity": False, "view_diversity": False},
    "MD+TD": {"temporal_diversity": True, "view_diversity": False},
    "MD+VD": {"temporal_diversity": False, "view_diversity": True},
    "MD+TD+VD": {"temporal_diversity": True, "view_diversity": True},
}
DM2_LOSS = {"name": "multiscale_triplet", "params": {"margin": 0.2, "sampling": "distance_weighted"}}
METRIX_LOSSES: dict[str, dict[str, Any]] = {
    "contrastive": {"name": "multiscale_contrastive", "params": {"pos_margin": 0.0, "neg_margin": 0.7}},
    "multi-similarity": {"name": "multiscale_multisimilarity", "params": {}},
    "proxy anchor": {"name": "multiscale_proxy_anchor", "params": {}},
    "ProxyNCA++": {"name": "multiscale_proxy_nca_pp", "params": {}},
}
MIXUPS = ("none", "input", "feature", "embedding")
BATCH_CLASSES, BATCH_IMAGES = 8, 4
#: The relation loss's weight rises over this fraction of the run (the paper's 3 epochs are of runs of hundreds).
WARMUP_FRACTION = 0.2


def _datasets(name: str, size: int) -> tuple[Any, Any, list[str]]:
    """``(train, test, recipe overrides)`` of one dataset."""
    from retrieval.config import load_config
    from retrieval.data.synthetic import generate_split
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path

    batch = [f"sampler.classes_per_batch={BATCH_CLASSES}", f"sampler.images_per_class={BATCH_IMAGES}"]
    if name == "synthetic":
        synthetic = load_config(TrainConfig, recipe_path(RECIPE), [f"data.synthetic.image_size={size}"]).data.synthetic
        return generate_split(synthetic, "train"), generate_split(synthetic, "test"), batch
    from retrieval.data.datasets import open_dataset

    labels = CLOTHING / "labels.csv"
    train, test = open_dataset(labels, split="validation"), open_dataset(labels, split="test")
    return _in_memory(train), _in_memory(test), batch


def _in_memory(dataset: Any, long_side: int = 128) -> Any:
    """The dataset's photos decoded once and shrunk to ``long_side``: each step then costs the model, not JPEG."""
    from retrieval.data.datasets import InMemoryImageDataset

    images = []
    for index in range(len(dataset)):
        image = dataset.load_image(index)
        image.thumbnail((long_side, long_side))
        images.append(image.copy())
    return InMemoryImageDataset(images, dataset.labels, dataset.schema, dataset.vocab, list(dataset.names))


def _config(loss: dict[str, Any], seed: int, args: argparse.Namespace, overrides: list[str], **sections: Any) -> Any:
    from retrieval.config import load_config
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path

    config = load_config(
        TrainConfig,
        recipe_path(RECIPE),
        [
            *overrides,
            f"model.preprocess.input_size={args.size}",
            f"schedule.max_steps={args.steps}",
            "schedule.max_minutes=null",
            "checkpoint_every=0",
            "eval_every=0",
            "optim.loss_lr_mult=10.0",  # proxies learn at 10x (proxy losses' usual setting; no effect on pair losses)
            f"seed={seed}",
            "device=cpu",
        ],
    )
    update = {"loss": config.loss.model_copy(update=loss), **sections}
    return TrainConfig.model_validate({**config.model_dump(), **{k: _dump(v) for k, v in update.items()}})


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def _report(vectors: Any, test: Any) -> dict[str, Any]:
    from retrieval.evaluation.protocols import evaluate_embeddings

    report = evaluate_embeddings(vectors, test.labels, schema=test.schema, ks=(1,))
    return {"per_level": report.per_level, "mean": report.mean}


def _train(config: Any, train: Any, out: Path) -> tuple[Any, float]:
    from training.trainer import Trainer

    trainer = Trainer(config, train, None, out_dir=out, progress=False)
    started = time.perf_counter()
    trainer.fit(resume=False)
    return trainer, time.perf_counter() - started


def _dm2_run(variant: str, cohort: int, seed: int, data: tuple[Any, Any, list[str]], args: Any, out: Path) -> dict:
    from models.ensemble import join_embeddings

    train, test, overrides = data
    warmup_epochs = WARMUP_FRACTION * args.steps * BATCH_CLASSES * BATCH_IMAGES / len(train)
    mutual = {"size": cohort, "warmup_epochs": warmup_epochs, **DM2_VARIANTS[variant]}
    trainer, seconds = _train(_config(DM2_LOSS, seed, args, overrides, mutual=mutual), train, out)
    vectors = [trainer.embed(test, model) for model in trainer.objective.models]
    result = {
        "models": [_report(v, test) for v in vectors],
        "ensemble": _report(join_embeddings(vectors), test),
        "seconds": seconds,
    }
    if variant == "independent" and cohort == 4:  # the independent cohort of 2: its first two models
        result["cohort2"] = {"models": result["models"][:2], "ensemble": _report(join_embeddings(vectors[:2]), test)}
    return result


def _metrix_run(loss: str, mixup: str, seed: int, data: tuple[Any, Any, list[str]], args: Any, out: Path) -> dict:
    train, test, overrides = data
    sections = {} if mixup == "none" else {"mixup": {"kind": mixup}}
    trainer, seconds = _train(_config(METRIX_LOSSES[loss], seed, args, overrides, **sections), train, out)
    return {"models": [_report(trainer.embed(test), test)], "seconds": seconds}


def _plan(parts: list[str]) -> list[tuple[str, str, str, int]]:
    """``(part, method, variant, cohort)`` of every run of one dataset and seed."""
    runs: list[tuple[str, str, str, int]] = []
    if "dm2" in parts:
        runs.append(("dm2", "independent", "independent", 4))
        runs += [("dm2", v, v, c) for v in DM2_VARIANTS if v != "independent" for c in COHORTS]
    if "metrix" in parts:
        runs += [("metrix", loss, mixup, 1) for loss in METRIX_LOSSES for mixup in MIXUPS]
    return runs


def _result_path(workdir: Path, dataset: str, part: str, method: str, variant: str, cohort: int, seed: int) -> Path:
    slug = f"{dataset}-{part}-{method}-{variant}-c{cohort}-seed{seed}".replace(" ", "_").replace("+", "p")
    return workdir / "results" / f"{slug}.json"


# ---------------------------------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _metric(report: dict[str, Any], level: str, metric: str) -> float:
    return report["mean"][metric] if level == "mean" else report["per_level"][level][metric]


def _dm2_cells(runs: list[dict], variant: str, cohort: int, level: str, metric: str) -> list[str]:
    if variant == "independent" and cohort == 2:
        rows = [r["result"]["cohort2"] for r in runs if r["variant"] == "independent"]
    else:
        rows = [r["result"] for r in runs if r["variant"] == variant and r["cohort"] == cohort]
    single = [statistics.fmean(_metric(m, level, metric) for m in row["models"]) for row in rows]
    ensemble = [_metric(row["ensemble"], level, metric) for row in rows]
    return [_mean_std(single), _mean_std(ensemble)]


def _dm2_table(runs: list[dict], level: str, metric: str) -> list[str]:
    header = "| method | " + " | ".join(f"cohort {c} single | cohort {c} ensemble" for c in COHORTS) + " |"
    lines = [header, "|---|" + "---|---|" * len(COHORTS)]
    for variant in DM2_VARIANTS:
        cells = [cell for cohort in COHORTS for cell in _dm2_cells(runs, variant, cohort, level, metric)]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _metrix_table(runs: list[dict], level: str, metric: str) -> list[str]:
    lines = ["| loss | " + " | ".join(MIXUPS) + " |", "|---|" + "---|" * len(MIXUPS)]
    for loss in METRIX_LOSSES:
        cells = []
        for mixup in MIXUPS:
            rows = [r["result"] for r in runs if r["method"] == loss and r["variant"] == mixup]
            cells.append(_mean_std([_metric(row["models"][0], level, metric) for row in rows]))
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return lines


def _seconds_per_model_step(runs: list[dict], steps: int) -> float:
    per = [r["result"]["seconds"] / (steps * max(r["cohort"], 1)) for r in runs]
    return statistics.median(per) if per else 0.0


def _markdown(part: str, dataset: str, runs: list[dict], meta: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in runs})
    steps = runs[0]["steps"]
    levels = list(runs[0]["result"]["models"][0]["per_level"])
    title = "DM² mutual learning" if part == "dm2" else "Metrix mixup"
    lines = [
        f"# {title} on {dataset}",
        "",
        f"Encoder: the `{RECIPE}` architecture (timm resnet10t from scratch, GeM, 128-d) at {meta['size']} px;",
        f"{steps} optimiser steps per model (the fixed budget), batches of {meta['batch']} ({BATCH_CLASSES} classes x"
        f" {BATCH_IMAGES}), seeds"
        f" {', '.join(map(str, seeds))}; test split, every image querying all the others;",
        "metrics in %, mean ± std over seeds. Median CPU seconds per model step: "
        f"{_seconds_per_model_step(runs, steps):.2f} (2-core machine; other work shared it during some runs).",
        "",
    ]
    if part == "dm2":
        lines += [
            "Base loss: triplet (margin 0.2) with distance-weighted sampling, summed over the levels. *single* = mean",
            "over the cohort's models, *ensemble* = their embeddings concatenated and re-normalised. *independent* =",
            "the same cohort with the relation loss off (weight 0): models that learn alone, on the same batches.",
            f"DM²: relation-loss weight 20, warmed up linearly over the first {WARMUP_FRACTION:.0%} of the steps.",
            "",
        ]
    else:
        lines += [
            "Each base loss alone (*none*) and with Metrix mixup of the inputs, feature maps or embeddings",
            "(lam ~ Beta(2, 2), mixed-loss weight 0.4, pairs drawn at the fine level), losses summed over the levels.",
            "",
        ]
    lines += ["Regenerate with:", "", f"    {meta['command']} --datasets {dataset}", ""]
    table = _dm2_table if part == "dm2" else _metrix_table
    for level in ["fine", *[lv for lv in levels if lv != "fine"], "mean"]:
        for metric in ("R@1", "mAP"):
            heading = f"## {metric}, {level if level != 'mean' else 'mean over levels'}"
            lines += [heading, "", *table(runs, level, metric), ""]
    return "\n".join(lines)


def _write_reports(args: argparse.Namespace, command: str) -> None:
    records = [json.loads(path.read_text()) for path in sorted((args.workdir / "results").glob("*.json"))]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dm2-metrix.json").write_text(json.dumps(records, indent=1) + "\n")
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for part in ("dm2", "metrix"):
            runs = [r for r in records if r["dataset"] == dataset and r["part"] == part]
            if runs:
                meta = {"command": command, "size": runs[0]["size"], "batch": runs[0]["batch"]}
                (args.out / f"{part}-{dataset}.md").write_text(_markdown(part, dataset, runs, meta) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,clothing", help="comma-separated: synthetic, clothing")
    parser.add_argument("--parts", default="dm2,metrix", help="comma-separated: dm2, metrix")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per model (the fixed budget)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--size", type=int, default=48, help="input size in pixels (synthetic images rendered at it)")
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments/dm2-metrix"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from saved results")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    datasets = args.datasets.split(",")
    if "clothing" in datasets and not (CLOTHING / "labels.csv").is_file():
        print(f"skipping clothing: {CLOTHING} is absent", file=sys.stderr)
        datasets.remove("clothing")
    command = (
        f"python experiments/dm2_metrix.py --steps {args.steps} --size {args.size} --seeds {args.seeds} --threads 1"
    )
    if not args.report_only:
        for dataset in datasets:
            data = _datasets(dataset, args.size)
            print(f"{dataset}: train {len(data[0])}, test {len(data[1])}", file=sys.stderr)
            for seed in [int(s) for s in args.seeds.split(",")]:
                for part, method, variant, cohort in _plan(parts):
                    path = _result_path(args.workdir, dataset, part, method, variant, cohort, seed)
                    if path.is_file():
                        continue
                    out = args.workdir / "runs" / path.stem
                    if part == "dm2":
                        result = _dm2_run(variant, cohort, seed, data, args, out)
                    else:
                        result = _metrix_run(method, variant, seed, data, args, out)
                    record = {
                        "dataset": dataset,
                        "part": part,
                        "method": method,
                        "variant": variant,
                        "cohort": cohort,
                        "seed": seed,
                        "steps": args.steps,
                        "size": args.size,
                        "batch": BATCH_CLASSES * BATCH_IMAGES,
                        "result": result,
                    }
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(record) + "\n")
                    fine = statistics.fmean(m["per_level"]["fine"]["R@1"] for m in result["models"])
                    ensemble = result.get("ensemble", result["models"][0])["per_level"]["fine"]["R@1"]
                    print(
                        f"{dataset} {part} {method} {variant} c{cohort} seed {seed}: fine R@1 single {100 * fine:.1f}"
                        f" ensemble {100 * ensemble:.1f} ({result['seconds']:.0f} s)",
                        file=sys.stderr,
                    )
                    _write_reports(args, command)
    _write_reports(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
