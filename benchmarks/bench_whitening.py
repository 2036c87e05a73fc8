"""Descriptor whitening before/after: none vs PCA vs learned whitening, on synthetic and on real photos.

Usage:
    python benchmarks/bench_whitening.py [--encoder CKPT] [--steps 300] [--work-dir DIR] [--fit-split val]
                                         [--clothing DIR] [--sweep] [--threads 1] [--json]

Without ``--encoder``, a small encoder is trained first with the ``quickstart`` recipe for ``--steps`` steps (a
few minutes on CPU) and saved under ``--work-dir``; pass that checkpoint as ``--encoder`` next time.

Two evaluations, each fitting the whitening on one labelled split and measuring on another:

1. the synthetic hierarchical set (``retrieval.data.synthetic``): fit on ``--fit-split`` (``val``: fresh images
   of the training classes; or ``train``), evaluate on ``test``, whose fine classes the encoder never saw;
2. ``../shared/data/clothing-small`` (real JPEGs; skipped with a message when absent): fit on its
   ``validation`` split, evaluate on ``test``, with the same synthetic-trained encoder: a domain shift like
   a user's encoder on their own photos.

Rows: ``none`` (the encoder's vectors), ``pca`` and ``learned`` fitted on the fit split with the defaults of
``indexing.whitening``, and ``pca@gallery``, fitted on the evaluated images themselves without labels (what
``retrieval index build --whiten pca`` does by default). ``--sweep`` adds other shrinkage values and half the
dimensions.

Columns: per label level R@1 and mAP (leave-one-out on the evaluated split: each image queries all the
others, never itself; ``retrieval.evaluation.protocols.evaluate_embeddings``), then the spread of the cosine
scores of all pairs (median and 5th-95th percentiles), the medians of positive (same fine class) and negative
pairs, their gap, d' = (mean pos - mean neg) / pooled std (scale-free, comparable across rows), and the best
F1 of a single score threshold separating positive from negative pairs, with that threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CLOTHING_SMALL = REPO_ROOT.parent / "shared" / "data" / "clothing-small"


def _train_encoder(work: Path, steps: int, seed: int, threads: int) -> Path:
    from retrieval.config import load_config
    from training.config import TrainConfig
    from training.recipe_paths import find_recipe
    from training.trainer import train

    overrides = [
        f"out_dir={work / 'train'}",
        f"seed={seed}",
        f"schedule.max_steps={steps}",
        "schedule.max_minutes=30",
        f"eval_every={steps}",
        f"checkpoint_every={steps}",
        "device=cpu",
        f"cpu_threads={threads}",
    ]
    config = load_config(TrainConfig, find_recipe("quickstart"), overrides)
    start = time.perf_counter()
    result = train(config, resume=True, progress=True)
    print(f"# trained the quickstart encoder for {steps} steps in {time.perf_counter() - start:.0f}s", flush=True)
    return Path(result.encoder_path)


def _embed(encoder: Any, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    from indexing.extract import extract_embeddings

    extraction = extract_embeddings(encoder, dataset, batch_size=64, progress=False)
    return extraction.embeddings, np.asarray(dataset.labels)[extraction.indices]


def _pair_scores(vectors: np.ndarray, fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every unordered pair of distinct items, and whether the pair shares its fine class."""
    scores = vectors @ vectors.T
    upper = np.triu_indices(len(vectors), k=1)
    return scores[upper], (fine[:, None] == fine[None, :])[upper]


def _best_f1(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """The best F1 of "score above t means same class" over all thresholds t, and that t."""
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(positive[order])
    kept = np.arange(1, len(scores) + 1)
    f1 = 2 * hits / (kept + positive.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(scores[order][best])


def _spread(vectors: np.ndarray, fine: np.ndarray) -> dict[str, float]:
    scores, positive = _pair_scores(vectors, fine)
    pos, neg = scores[positive], scores[~positive]
    pooled = np.sqrt((pos.var() + neg.var()) / 2)
    f1, threshold = _best_f1(scores, positive)
    p5, median, p95 = np.percentile(scores, [5, 50, 95])
    return {
        "median": float(median),
        "p5": float(p5),
        "p95": float(p95),
        "pos_median": float(np.median(pos)),
        "neg_median": float(np.median(neg)),
        "gap": float(np.median(pos) - np.median(neg)),
        "d_prime": float((pos.mean() - neg.mean()) / pooled),
        "best_f1": f1,
        "f1_threshold": threshold,
    }


def _metrics(vectors: np.ndarray, labels: np.ndarray, levels: list[str]) -> dict[str, dict[str, float]]:
    from retrieval.evaluation.protocols import evaluate_embeddings

    report = evaluate_embeddings(vectors, labels, schema=levels, ks=(1,))
    return {level: {"R@1": values["R@1"], "mAP": values["mAP"]} for level, values in report.per_level.items()}


def _whitenings(fit: np.ndarray, fit_fine: np.ndarray, gallery: np.ndarray, sweep: bool) -> list[tuple[str, Any]]:
    from indexing.whitening import fit_learned_whitening, fit_pca_whitening

    rows: list[tuple[str, Any]] = [
        ("none", None),
        ("pca", fit_pca_whitening(fit)),
        ("learned", fit_learned_whitening(fit, fit_fine)),
        ("pca@gallery", fit_pca_whitening(gallery)),
    ]
    if sweep:
        for shrinkage in (0.0, 0.01, 1.0):
            rows.append((f"pca s={shrinkage:g}", fit_pca_whitening(fit, shrinkage=shrinkage)))
            rows.append((f"learned s={shrinkage:g}", fit_learned_whitening(fit, fit_fine, shrinkage=shrinkage)))
        half = fit.shape[1] // 2
        rows.append((f"pca d={half}", fit_pca_whitening(fit, dim=half)))
        rows.append((f"learned d={half}", fit_learned_whitening(fit, fit_fine, dim=half)))
    return rows


def _evaluate(
    name: str, fit: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], levels: list[str], sweep: bool
) -> dict[str, Any]:
    (fit_x, fit_labels), (test_x, test_labels) = fit, test
    rows = []
    for method, whitening in _whitenings(fit_x, fit_labels[:, 0], test_x, sweep):
        vectors = test_x if whitening is None else whitening.apply(test_x)
        rows.append(
            {
                "method": method,
                "dim": int(vectors.shape[1]),
                "levels": _metrics(vectors, test_labels, levels),
                "scores": _spread(vectors, test_labels[:, 0]),
            }
        )
    return {"dataset": name, "fit_images": len(fit_x), "test_images": len(test_x), "levels": levels, "rows": rows}


def _synthetic(encoder: Any, fit_split: str, sweep: bool) -> dict[str, Any]:
    from retrieval.data.synthetic import SyntheticConfig, generate_split

    cfg = SyntheticConfig(image_size=encoder.config.preprocess.input_size)
    fit, test = generate_split(cfg, fit_split), generate_split(cfg, "test")
    result = _evaluate("synthetic", _embed(encoder, fit), _embed(encoder, test), list(test.schema.levels), sweep)
    result["fit_split"] = fit_split
    return result


def _clothing(encoder: Any, root: Path, sweep: bool) -> dict[str, Any] | None:
    from retrieval.data.datasets import open_dataset

    if not (root / "labels.csv").is_file():
        print(f"# {root} not found: the clothing-small evaluation is skipped", flush=True)
        return None
    fit = open_dataset(root / "labels.csv", split="validation")
    test = open_dataset(root / "labels.csv", split="test")
    if list(fit.schema.levels) != list(test.schema.levels):
        raise SystemExit("clothing-small: the validation and test splits carry different levels")
    result = _evaluate("clothing-small", _embed(encoder, fit), _embed(encoder, test), list(test.schema.levels), sweep)
    result["fit_split"] = "validation"
    return result


def _print_table(result: dict[str, Any]) -> None:
    levels = result["levels"]
    print(
        f"\n## {result['dataset']}: fit on {result['fit_split']} ({result['fit_images']} images), "
        f"evaluated on test ({result['test_images']} images, leave-one-out)"
    )
    head = f"{'method':<16}{'dim':>5}"
    for level in levels:
        head += f"{level + ' R@1':>13}{level + ' mAP':>13}"
    head += f"{'median':>8}{'p5':>8}{'p95':>8}{'pos med':>9}{'neg med':>9}{'gap':>7}{'d`':>6}{'best F1':>9}{'at':>8}"
    print(head)
    for row in result["rows"]:
        line = f"{row['method']:<16}{row['dim']:>5}"
        for level in levels:
            metrics = row["levels"][level]
            line += f"{metrics['R@1']:>13.3f}{metrics['mAP']:>13.3f}"
        s = row["scores"]
        line += (
            f"{s['median']:>8.3f}{s['p5']:>8.3f}{s['p95']:>8.3f}{s['pos_median']:>9.3f}{s['neg_median']:>9.3f}"
            f"{s['gap']:>7.3f}{s['d_prime']:>6.2f}{s['best_f1']:>9.3f}{s['f1_threshold']:>8.3f}"
        )
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", type=Path, help="encoder checkpoint (default: train one with --steps)")
    parser.add_argument("--steps", type=int, default=300, help="quickstart training steps when no --encoder")
    parser.add_argument("--work-dir", type=Path, default=Path("bench-whitening-run"))
    parser.add_argument("--fit-split", choices=["val", "train"], default="val")
    parser.add_argument("--clothing", type=Path, default=CLOTHING_SMALL, help="the clothing-small folder")
    parser.add_argument("--sweep", action="store_true", help="also shrinkage 0, 0.01 and 1, and half the dims")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a busy shared CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    import torch

    from models import load_encoder

    torch.set_num_threads(args.threads)
    encoder_path = args.encoder or _train_encoder(args.work_dir.resolve(), args.steps, args.seed, args.threads)
    encoder = load_encoder(encoder_path)
    start = time.perf_counter()
    results = [_synthetic(encoder, args.fit_split, args.sweep)]
    clothing = _clothing(encoder, args.clothing, args.sweep)
    if clothing is not None:
        results.append(clothing)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPUs visible"
    payload = {
        "encoder": str(encoder_path),
        "encoder_dim": encoder.embedding_dim,
        "machine": machine,
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    if args.json:
        print(json.dumps(payload, indent=2))
        return 0
    print(f"# encoder {encoder_path} ({encoder.embedding_dim}-d); {machine}; {payload['seconds']}s")
    for result in results:
        _print_table(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
