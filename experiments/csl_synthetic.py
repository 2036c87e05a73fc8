"""CSL against the multi-scale baselines on the synthetic hierarchical dataset, with a fixed CPU budget.

Usage:
    python experiments/csl_synthetic.py [--steps 400] [--seeds 0,1,2] [--methods all] [--out docs/experiments]

Every method trains the packaged ``csl-synthetic-cpu`` recipe (resnet10t from scratch at 64 px,
16 fine classes x 4 images with sibling pairs under a middle class) for the same number of steps;
only the loss changes:

* ``fine-only``: CosFace on the fine labels alone (the single-scale metric of DyML section 6.1);
* ``cosface-ms``: multi-scale CosFace, one head per level, summed;
* ``normsoftmax-ms``: multi-scale normalised softmax;
* ``csl``: Cross-Scale Learning (classification form).

Each trained encoder embeds the held-out test split (fine classes never seen in training, shared
middle/coarse classes) and is scored with the DyML metrics per level, every image querying all the
others: mAP, R@1 and ASI; overall = the mean of the levels. The script writes ``csl-synthetic.json``
(every run) and ``csl-synthetic.md`` (mean +- std over seeds) into ``--out``.
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
    "fine-only": {"name": "multiscale_cosface", "params": {"scale": 30.0, "margin": 0.2, "levels": ["fine"]}},
    "cosface-ms": {"name": "multiscale_cosface", "params": {"scale": 30.0, "margin": 0.2}},
    "normsoftmax-ms": {"name": "multiscale_normsoftmax", "params": {"scale": 16.0}},
    "csl": {"name": "csl", "params": {"gamma": 32.0, "margins": [0.25, 0.35, 0.45], "negatives": "hardest"}},
}
METRICS = ("mAP", "R@1", "ASI")
RECIPE = "csl-synthetic-cpu"


def _run(method: str, seed: int, steps: int, workdir: Path, data: tuple[Any, Any]) -> dict[str, Any]:
    from retrieval.config import load_config
    from retrieval.evaluation.protocols import evaluate_embeddings
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path
    from training.trainer import Trainer

    train, test = data
    config = load_config(TrainConfig, recipe_path(RECIPE), [f"schedule.max_steps={steps}", f"seed={seed}"])
    config = config.model_copy(
        update={"loss": config.loss.model_copy(update=METHODS[method]), "checkpoint_every": 0, "eval_every": 0}
    )
    trainer = Trainer(config, train, None, out_dir=workdir / f"{method}-seed{seed}", progress=False)
    started = time.perf_counter()
    result = trainer.fit(resume=False)
    train_seconds = time.perf_counter() - started
    report = evaluate_embeddings(trainer.embed(test), test.labels, schema=test.schema, ks=(1, 10, 20), asi=True)
    return {
        "method": method,
        "seed": seed,
        "steps": result.steps,
        "seconds_per_step": train_seconds / max(result.steps_this_run, 1),
        "images_per_second": result.images_per_second,
        "per_level": report.per_level,
        "overall": report.mean,
    }


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _markdown(runs: list[dict[str, Any]], command: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in runs))
    levels = list(runs[0]["per_level"])
    seeds = sorted({r["seed"] for r in runs})
    steps = runs[0]["steps"]
    step_time = statistics.median(r["seconds_per_step"] for r in runs)
    lines = [
        "# CSL vs multi-scale baselines on the synthetic hierarchical dataset",
        "",
        f"Recipe `{RECIPE}` (resnet10t from scratch, 64 px, 128-d, 16 fine classes x 4 images, sibling pairs",
        f"under a middle class), {steps} steps per run, seeds {', '.join(map(str, seeds))}; only the loss differs.",
        "Test split: held-out fine classes (open set), middle and coarse classes shared with training; every",
        "test image queries all the others; metrics in %, mean ± std over seeds; overall = mean of the levels.",
        f"CPU time per training step: {step_time:.2f} s (median over the runs; batch 64 on a 2-core CPU,",
        "shared with other jobs during some runs).",
        "",
        "Regenerate with:",
        "",
        f"    {command}",
        "",
    ]
    for scope in ["overall", *levels]:
        lines += [f"## {scope}", "", "| method | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for method in methods:
            chosen = [r for r in runs if r["method"] == method]
            cells = [
                _mean_std([(r["overall"] if scope == "overall" else r["per_level"][scope])[m] for r in chosen])
                for m in METRICS
            ]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (the fixed budget)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"), help="where the table and JSON go")
    parser.add_argument("--workdir", type=Path, default=Path("runs/experiments/csl-synthetic"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--report-only", type=Path, default=None, help="re-render the table from a saved JSON")
    args = parser.parse_args(argv)
    if args.report_only is not None:
        runs = json.loads(args.report_only.read_text())
        command = "python experiments/csl_synthetic.py --steps {} --seeds {}".format(
            runs[0]["steps"], ",".join(str(s) for s in sorted({r["seed"] for r in runs}))
        )
        print(_markdown(runs, command))
        return 0

    import torch

    from retrieval.config import load_config
    from retrieval.data.synthetic import generate_split
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path

    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    synthetic = load_config(TrainConfig, recipe_path(RECIPE)).data.synthetic
    data = generate_split(synthetic, "train"), generate_split(synthetic, "test")
    print(f"train {len(data[0])} images, test {len(data[1])} images (held-out fine classes)", file=sys.stderr)

    runs = []
    for seed in seeds:
        for method in methods:
            run = _run(method, seed, args.steps, args.workdir, data)
            runs.append(run)
            overall = ", ".join(f"{m} {100 * run['overall'][m]:.1f}" for m in METRICS)
            print(f"{method:>15} seed {seed}: {overall} ({run['seconds_per_step']:.2f} s/step)", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "csl-synthetic.json").write_text(json.dumps(runs, indent=2) + "\n")
    command = "python experiments/csl_synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = _markdown(runs, command.strip())
    (args.out / "csl-synthetic.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
