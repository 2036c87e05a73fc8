"""What each training option costs: seconds per optimiser step of Metrix mixup and DM² cohorts against plain
training, measured side by side in one run.

Usage:
    python benchmarks/bench_training_options.py [--steps 10] [--rounds 3] [--threads 2] [--size 64]

Every option trains the ``quickstart`` architecture (resnet10t from scratch, GeM, 128-d) on the synthetic set with
P x K = 16 x 4 batches and the multi-similarity loss (it has the soft-label form Metrix needs). Each round runs
every option for ``--steps`` steps after one untimed warm-up step, in turn, so a change of load on the machine
hits them all; the table gives the median over rounds of the training throughput (data loading and the
optimiser step; no evaluation or saving) as seconds per step, its ratio to plain training, and for a cohort the
ratio per model (a cohort of L trains L models: about L times one model is the expected cost).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "metrix input": {"mixup": {"kind": "input"}},
    "metrix feature": {"mixup": {"kind": "feature"}},
    "metrix embedding": {"mixup": {"kind": "embedding"}},
    "dm2 L=2 MD": {"mutual": {"size": 2, "temporal_diversity": False, "view_diversity": False}},
    "dm2 L=2 MD+TD+VD": {"mutual": {"size": 2}},
    "dm2 L=4 MD": {"mutual": {"size": 4, "temporal_diversity": False, "view_diversity": False}},
    "dm2 L=4 MD+TD+VD": {"mutual": {"size": 4}},
}


def _config(option: dict[str, Any], steps: int, size: int) -> Any:
    from retrieval.config import load_config
    from training.config import TrainConfig
    from training.recipe_paths import recipe_path

    config = load_config(
        TrainConfig,
        recipe_path("quickstart"),
        [
            f"data.synthetic.image_size={size}",
            f"model.preprocess.input_size={size}",
            "loss.name=multiscale_multisimilarity",
            "loss.params={}",
            f"schedule.max_steps={steps + 1}",
            "schedule.max_minutes=null",
            "eval_every=0",
            "checkpoint_every=0",
            "log_every=1",
            "device=cpu",
        ],
    )
    return TrainConfig.model_validate({**config.model_dump(), **option})


def _seconds_per_step(option: dict[str, Any], steps: int, size: int, train: Any, workdir: Path) -> float:
    from training.trainer import Trainer

    config = _config(option, steps, size)
    trainer = Trainer(config, train, None, out_dir=workdir, progress=False)
    trainer.fit(resume=False, stop_at_step=1)  # warm-up: first-call allocations, thread pools
    result = trainer.fit()  # resumes after the warm-up step: the timed steps
    batch = config.sampler.classes_per_batch * config.sampler.images_per_class
    return batch / result.images_per_second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per option and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all options (median taken)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--options", default="all", help=f"comma-separated subset of: {', '.join(OPTIONS)}")
    args = parser.parse_args(argv)

    import os

    import torch

    from retrieval.data.synthetic import SyntheticConfig, generate_split

    torch.set_num_threads(args.threads)
    names = list(OPTIONS) if args.options == "all" else args.options.split(",")
    if "plain" not in names:
        names.insert(0, "plain")
    train = generate_split(SyntheticConfig(image_size=args.size), "train")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for name in names:
                workdir = Path(tmp) / f"{name}-{round_index}"
                seconds = _seconds_per_step(OPTIONS[name], args.steps, args.size, train, workdir)
                times[name].append(seconds)
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    plain = statistics.median(times["plain"])
    load = os.getloadavg()
    print(
        f"\nresnet10t at {args.size} px, batch 64, multi-similarity, {args.steps} steps x {args.rounds} rounds, "
        f"{args.threads} thread(s), CPU; load average {load[0]:.1f} / {load[1]:.1f}"
    )
    print(f"{'option':<20} {'s/step':>8} {'x plain':>8} {'x plain per model':>18}")
    for name in names:
        seconds = statistics.median(times[name])
        models = OPTIONS[name].get("mutual", {}).get("size", 1)
        print(f"{name:<20} {seconds:>8.3f} {seconds / plain:>8.2f} {seconds / plain / models:>18.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
