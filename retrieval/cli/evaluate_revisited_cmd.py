"""``retrieval evaluate revisited``: ROxford5k / RParis6k (+R1M) mAP and mP@k in the Easy, Medium and Hard setups.

Features come from an encoder run over the official layout (``--encoder``, optionally a lighter
``--query-encoder`` for the queries: the asymmetric setting), or from two saved ``.npy`` files
(``--features``), so published or earlier features can be scored without a model. Extraction is
multi-scale and aspect-preserving (``indexing.multiscale``); queries are cropped to their boxes.

Failure policy for unreadable images: the ground truth refers to queries and database images by
position, so one missing row would silently shift every index after it. An unreadable query or
database image therefore stops the run with an error naming the files. Unreadable distractors
are left out and counted (a distractor has no index in the ground truth).

Cache (``--cache-dir``, :mod:`indexing.feature_cache`): one ``.npy`` per side, named by dataset, side,
encoder id, a fingerprint of what was embedded (the ground-truth pickle's bytes for queries and database,
the file list for distractors), the scales and the maximum side. A re-run with the same settings loads
them instead of extracting, without loading the model; a file of the wrong shape is re-extracted and
replaced. The symmetric and asymmetric runs share the entries of the database side.

A ``--query-encoder`` must embed into the ``--encoder``'s space: be that encoder or a student distilled
against it (its ``teacher_id``); any other is refused (:mod:`retrieval.cli.pairing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrieval.cli.common import console, fail, print_json, user_errors

if TYPE_CHECKING:
    import numpy as np

    from indexing.feature_cache import CachedFeatures, FeatureKey, MultiscaleFeatures
    from retrieval.data.revisited import RevisitedDataset

__all__ = ["revisited"]

DISPLAY_NAMES = {"roxford5k": "ROxford5k", "rparis6k": "RParis6k"}
DEFAULT_SCALES = "0.7071,1,1.4142"
_MAX_NAMED = 5  # unreadable files named in an error message


def revisited(
    dataset: str = typer.Option(..., "--dataset", help="roxford5k or rparis6k."),
    data_root: Path = typer.Option(
        ..., "--data-root", help="Folder with gnd_<dataset>.pkl and jpg/ (or its parent, e.g. data/datasets)."
    ),
    encoder: Path | None = typer.Option(
        None, "--encoder", help="Checkpoint embedding the database (and the queries, unless --query-encoder)."
    ),
    query_encoder: Path | None = typer.Option(
        None, "--query-encoder", help="Asymmetric mode: checkpoint embedding the queries into --encoder's space."
    ),
    distractors: Path | None = typer.Option(
        None, "--distractors", help="+R1M: a folder of distractor images, or their (N, D) float32 features (.npy)."
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache extracted features here as .npy; a re-run with the same settings reuses them."
    ),
    features: str | None = typer.Option(
        None, "--features", help="QUERY.npy,DB.npy: score saved features (rows in the ground truth's order), no model."
    ),
    max_side: int = typer.Option(1024, "--max-side", min=8, help="Longest image side at scale 1 (pixels)."),
    scales: str = typer.Option(DEFAULT_SCALES, "--scales", help="Comma-separated image scales, averaged."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images per forward pass."),
    num_workers: int = typer.Option(0, "--num-workers", min=0, help="Processes decoding images (0 = this one)."),
    eval_batch_size: int = typer.Option(
        8, "--eval-batch-size", min=1, help="Queries ranked at a time (memory ~ 16 bytes x this x database size)."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Revisited Oxford/Paris: mAP and mP@1/5/10 in the Easy, Medium and Hard setups (optionally +R1M).

    Easy counts easy images as positives (hard ones are junk), Medium counts easy and hard, Hard
    counts only hard ones (easy ones are junk). Junk is removed from each ranking; AP is the
    official trapezoid rule. Queries are cropped to their bounding boxes before embedding.
    """
    with user_errors():
        from retrieval.data.revisited import open_revisited

        _check_options(encoder, query_encoder, features, cache_dir, distractors)
        scale_values = _parse_scales(scales)
        bench = open_revisited(dataset, data_root, require_images=features is None)
        run = _Run(bench, scale_values, max_side, batch_size, num_workers, device, cache_dir, progress=not as_json)
        if features is not None:
            queries, database = _saved_features(features, bench)
            extra = _distractor_features(distractors, database.shape[1]) if distractors is not None else None
        else:
            assert encoder is not None
            queries, database, extra = run.embed_all(encoder, query_encoder, distractors)
        report = _evaluate(queries, database, extra, bench, eval_batch_size)

    mode = "saved features" if features is not None else "asymmetric" if query_encoder is not None else "symmetric"
    num_distractors = 0 if extra is None else len(extra)
    if as_json:
        payload: dict[str, Any] = {
            **report.to_dict(),
            "protocol": "revisited",
            "dataset": bench.name,
            "mode": mode,
            "distractors": num_distractors,
            "skipped_distractors": run.skipped_distractors,
            "cache": {"loaded": run.loaded, "written": run.written},
            "notes": run.notes,
        }
        if features is None:
            payload["encoder_id"] = run.ids.get("database")
            payload["query_encoder_id"] = run.ids.get("query")
        print_json(payload)
        return
    for note in run.notes:
        console.print(f"[yellow]{note}[/]", highlight=False)
    plus = f" +R1M ({num_distractors:,} distractors)" if extra is not None else ""
    title = (
        f"{DISPLAY_NAMES[bench.name]}{plus}, {mode}: mAP and mP@k in % (official trapezoid AP), "
        f"{report.num_queries} queries, {report.num_database:,} database images"
    )
    console.print(report.format_table(title=title), highlight=False, soft_wrap=True)
    if run.skipped_distractors:
        console.print(f"[yellow]left out {run.skipped_distractors} unreadable distractor images[/]")
    if run.loaded:
        console.print(f"loaded cached features: {', '.join(run.loaded)}", highlight=False)


def _check_options(
    encoder: Path | None,
    query_encoder: Path | None,
    features: str | None,
    cache_dir: Path | None,
    distractors: Path | None,
) -> None:
    """Exactly one source of features, and only the options that go with it."""
    if (encoder is None) == (features is None):
        raise typer.BadParameter("give exactly one of --encoder (extract features) or --features QUERY.npy,DB.npy")
    if features is not None:
        if query_encoder is not None or cache_dir is not None:
            raise typer.BadParameter("--query-encoder and --cache-dir only apply to features extracted by --encoder")
        if distractors is not None and distractors.is_dir():
            raise typer.BadParameter("with --features, --distractors must be a .npy file (there is no model to embed)")
    if distractors is not None and not distractors.exists():
        raise typer.BadParameter(f"--distractors not found: {distractors} (a folder of images or a .npy file)")


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v < 16 for v in values) or len(set(values)) != len(values):
        raise typer.BadParameter(f"--scales must be distinct positive numbers separated by commas, got {text!r}")
    return values


def _array_file(path: Path, what: str) -> np.ndarray:
    """A 2-D real array from a ``.npy`` file, memory-mapped, never unpickled; errors name the file."""
    import numpy as np

    if not path.is_file():
        raise fail(f"{what} file not found: {path}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise fail(f"{path}: not a .npy array file ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise fail(f"{path}: expected one (N, D) array in a .npy file, found an archive of several")
    if array.ndim != 2:
        raise fail(f"{path}: {what} must be a 2-D (N, D) array, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise fail(f"{path}: {what} must hold real numbers, got dtype {array.dtype}")
    return array


def _saved_features(spec: str, bench: RevisitedDataset) -> tuple[np.ndarray, np.ndarray]:
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise typer.BadParameter(f"--features must be QUERY.npy,DB.npy (two files), got {spec!r}")
    queries = _array_file(Path(parts[0]), "query features")
    database = _array_file(Path(parts[1]), "database features")
    name = bench.name
    if len(queries) != len(bench.queries):
        raise fail(f"{parts[0]}: {len(queries)} query rows but {name} has {len(bench.queries)} queries")
    if len(database) != len(bench.database):
        raise fail(f"{parts[1]}: {len(database)} database rows but {name} has {len(bench.database)} images")
    if queries.shape[1] != database.shape[1]:
        raise fail(
            f"query features have dimension {queries.shape[1]} but database features {database.shape[1]}; "
            "both must live in the same embedding space"
        )
    return queries, database


def _distractor_features(path: Path, dim: int) -> np.ndarray:
    array = _array_file(path, "distractor features")
    if array.shape[1] != dim:
        raise fail(f"{path}: distractor features have dimension {array.shape[1]} but the database has {dim}")
    return array


def _evaluate(
    queries: np.ndarray, database: np.ndarray, extra: np.ndarray | None, bench: RevisitedDataset, batch_size: int
) -> Any:
    from retrieval.evaluation.revisited import evaluate_revisited

    try:
        return evaluate_revisited(queries, database, bench.ground_truth, batch_size=batch_size, distractors=extra)
    except ValueError as exc:  # e.g. NaN in saved features
        raise fail(f"cannot evaluate {bench.name}: {exc}") from None


@dataclass
class _Run:
    """Extraction state of one command: settings, cache hits and what to print about them."""

    bench: RevisitedDataset
    scales: tuple[float, ...]
    max_side: int
    batch_size: int
    num_workers: int
    device: str
    cache_dir: Path | None
    progress: bool
    ids: dict[str, str] = field(default_factory=dict)
    loaded: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_distractors: int = 0
    _features: MultiscaleFeatures | None = None

    def embed_all(
        self, encoder: Path, query_encoder: Path | None, distractors: Path | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Query, database and distractor features (cached where possible)."""
        from indexing.feature_cache import file_fingerprint
        from models import read_checkpoint_info
        from retrieval.cli.pairing import check_query_encoder_pairing

        db_info = read_checkpoint_info(encoder)
        q_info = read_checkpoint_info(query_encoder) if query_encoder is not None else db_info
        check_query_encoder_pairing(q_info, db_info)
        self.ids = {"query": q_info.encoder_id, "database": db_info.encoder_id}
        gnd_fingerprint = file_fingerprint(self.bench.gnd_path)
        dim = db_info.config.embedding_dim
        queries = self._side(q_info.path, self._key("query", q_info.encoder_id, gnd_fingerprint), dim, "query")
        database = self._side(db_info.path, self._key("db", db_info.encoder_id, gnd_fingerprint), dim, "db")
        extra = None
        if distractors is not None:
            if distractors.is_dir():
                extra = self._distractor_images(distractors, db_info.path, db_info.encoder_id, dim)
            else:
                extra = _distractor_features(distractors, dim)
        return queries, database, extra

    def _key(self, side: str, encoder_id: str, fingerprint: str) -> FeatureKey:
        return self._extractor().key(self.bench.name, side, encoder_id, fingerprint)

    def _extractor(self) -> MultiscaleFeatures:
        from indexing.feature_cache import FeatureCache, MultiscaleFeatures

        if self._features is None:
            cache = FeatureCache(self.cache_dir) if self.cache_dir is not None else None
            self._features = MultiscaleFeatures(
                self.scales, self.max_side, self.batch_size, self.device, self.num_workers, self.progress, cache
            )
        return self._features

    def _side(self, checkpoint: Path, key: FeatureKey, dim: int, side: str) -> np.ndarray:
        """Queries or database: every image must be readable (row ``i`` is ground-truth index ``i``)."""
        dataset = self.bench.queries if side == "query" else self.bench.database
        result = self._extractor().features(checkpoint, dataset, key, dim, complete=True)
        if result.num_skipped:
            raise fail(_unreadable_message(self.bench.name, side, result.skipped.skipped))
        return self._record(result).embeddings

    def _distractor_images(self, folder: Path, checkpoint: Path, encoder_id: str, dim: int) -> np.ndarray:
        """Distractors: unreadable ones are left out and counted (they have no index in the ground truth)."""
        from indexing.feature_cache import names_fingerprint
        from retrieval.data.datasets import ImageFolderDataset

        images = ImageFolderDataset(folder)
        key = self._key("distractors", encoder_id, names_fingerprint(images.names))
        result = self._extractor().features(checkpoint, images, key, dim, complete=False)
        self.skipped_distractors = result.num_skipped
        return self._record(result).embeddings

    def _record(self, result: CachedFeatures) -> CachedFeatures:
        if result.loaded:
            self.loaded.append(result.loaded)
        if result.written:
            self.written.append(result.written)
        return result


def _unreadable_message(name: str, side: str, skipped: list[tuple[str, str]]) -> str:
    what = "query" if side == "query" else "database"
    named = "; ".join(f"{source} ({reason})" for source, reason in skipped[:_MAX_NAMED])
    more = f" and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
    return (
        f"{len(skipped)} unreadable {what} image(s) in {name}: {named}{more}. The ground truth refers to images "
        "by position, so every query and database image must be readable"
    )
