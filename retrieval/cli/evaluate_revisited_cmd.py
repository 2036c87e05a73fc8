"""``retrieval evaluate revisited``: ROxford5k / RParis6k (+R1M) mAP and mP@k in the Easy, Medium and Hard setups.

Features come from an encoder run over the official layout (``--encoder``, optionally a lighter
``--query-encoder`` for the queries: the asymmetric setting), or from two saved ``.npy`` files
(``--features``), so published or earlier features can be scored without a model. Extraction is
multi-scale and aspect-preserving (``indexing.multiscale``); queries are cropped to their boxes.

Failure policy for unreadable images: the ground truth refers to queries and database images by
position, so one missing row would silently shift every index after it. An unreadable query or
database image therefore stops the run with an error naming the files. Unreadable distractors
are left out and counted (a distractor has no index in the ground truth).

Cache (``--cache-dir``): one ``.npy`` per side, named by dataset, side, encoder id, a fingerprint of
what was embedded (the ground-truth pickle's bytes for queries and database, the file list for
distractors), the scales and the maximum side. A re-run with the same settings loads them instead
of extracting, without loading the model; a file of the wrong shape is re-extracted and replaced.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from retrieval.cli.common import console, fail, print_json, user_errors

if TYPE_CHECKING:
    import numpy as np

    from retrieval.data.datasets import LabelledImageDataset
    from retrieval.data.revisited import RevisitedDataset

__all__ = ["revisited"]

DISPLAY_NAMES = {"roxford5k": "ROxford5k", "rparis6k": "RParis6k"}
DEFAULT_SCALES = "0.7071,1,1.4142"
_MAX_NAMED = 5  # unreadable files named in an error message
_CACHE_FORMAT = "ms1"  # bump when indexing.multiscale changes what it computes, so old caches are not reused


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
    """Extraction state of one command: settings, loaded encoders, cache hits and notes to print."""

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
    _models: dict[Path, Any] = field(default_factory=dict)

    def embed_all(
        self, encoder: Path, query_encoder: Path | None, distractors: Path | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Query, database and distractor features (cached where possible)."""
        from models import read_checkpoint_info

        db_info = read_checkpoint_info(encoder)
        q_info = read_checkpoint_info(query_encoder) if query_encoder is not None else db_info
        if q_info.config.embedding_dim != db_info.config.embedding_dim:
            raise fail(
                f"--query-encoder {query_encoder} embeds into {q_info.config.embedding_dim} dimensions but "
                f"--encoder {encoder} into {db_info.config.embedding_dim}; asymmetric mode needs the same space"
            )
        if q_info.encoder_id != db_info.encoder_id and q_info.config.teacher_id != db_info.encoder_id:
            self.notes.append(
                f"note: the query encoder ({q_info.encoder_id}) was not distilled against the database encoder "
                f"({db_info.encoder_id}); its embeddings may not share that space"
            )
        self.ids = {"query": q_info.encoder_id, "database": db_info.encoder_id}
        from indexing.index_dir import file_sha256

        gnd_fingerprint = file_sha256(self.bench.gnd_path)[:12]
        dim = db_info.config.embedding_dim
        queries = self._features(q_info.path, q_info.encoder_id, dim, "query", self.bench.queries, gnd_fingerprint)
        database = self._features(db_info.path, db_info.encoder_id, dim, "db", self.bench.database, gnd_fingerprint)
        extra = None
        if distractors is not None:
            if distractors.is_dir():
                extra = self._distractor_images(distractors, db_info.path, db_info.encoder_id, dim)
            else:
                extra = _distractor_features(distractors, dim)
        return queries, database, extra

    def _distractor_images(self, folder: Path, checkpoint: Path, encoder_id: str, dim: int) -> np.ndarray:
        from retrieval.data.datasets import ImageFolderDataset

        images = ImageFolderDataset(folder)
        fingerprint = hashlib.sha256("\n".join(images.names).encode()).hexdigest()[:12]
        return self._features(checkpoint, encoder_id, dim, "distractors", images, fingerprint, strict=False)

    def _features(
        self,
        checkpoint: Path,
        encoder_id: str,
        dim: int,
        side: str,
        dataset: LabelledImageDataset,
        fingerprint: str,
        *,
        strict: bool = True,
    ) -> np.ndarray:
        """Features of ``dataset`` from the cache, or extracted (and cached) with the encoder at ``checkpoint``.

        With ``strict``, every image must be readable (row ``i`` is dataset item ``i``); otherwise
        unreadable items are left out and counted as skipped distractors.
        """
        cache = self._cache_path(side, encoder_id, fingerprint)
        if cache is not None:
            cached = _load_cached(cache, dim, len(dataset) if strict else None)
            if cached is not None:
                self.loaded.append(cache.name)
                if not strict:
                    self.skipped_distractors = len(dataset) - len(cached)
                return cached
        extraction = self._extract(checkpoint, dataset)
        if len(extraction.skipped):
            if strict:
                raise fail(_unreadable_message(self.bench.name, side, extraction.skipped.skipped))
            self.skipped_distractors = len(extraction.skipped)
        embeddings = extraction.embeddings
        if cache is not None:
            _save_atomic(cache, embeddings)
            self.written.append(cache.name)
        return embeddings

    def _extract(self, checkpoint: Path, dataset: LabelledImageDataset) -> Any:
        from indexing.multiscale import extract_multiscale
        from models import load_encoder

        if checkpoint not in self._models:
            self._models[checkpoint] = load_encoder(checkpoint, device=self.device)
        return extract_multiscale(
            self._models[checkpoint],
            dataset,
            scales=self.scales,
            max_side=self.max_side,
            batch_size=self.batch_size,
            device=self.device,
            num_workers=self.num_workers,
            progress=self.progress,
        )

    def _cache_path(self, side: str, encoder_id: str, fingerprint: str) -> Path | None:
        if self.cache_dir is None:
            return None
        scales = "_".join(f"{s:g}" for s in self.scales)
        name = (
            f"{self.bench.name}-{side}-enc{encoder_id}-{fingerprint}-s{scales}-max{self.max_side}-{_CACHE_FORMAT}.npy"
        )
        return self.cache_dir / name


def _load_cached(path: Path, dim: int, rows: int | None) -> np.ndarray | None:
    """The cached array if it exists and has the expected shape; ``None`` (re-extract) otherwise."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != dim:
        return None
    if rows is not None and len(array) != rows:
        return None
    return np.ascontiguousarray(array, dtype=np.float32)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` at ``path`` through ``atomic_file`` (never a half-written cache)."""
    import numpy as np

    from retrieval.atomic import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as fh:
        np.save(fh, np.ascontiguousarray(array, dtype=np.float32))


def _unreadable_message(name: str, side: str, skipped: list[tuple[str, str]]) -> str:
    what = "query" if side == "query" else "database"
    named = "; ".join(f"{source} ({reason})" for source, reason in skipped[:_MAX_NAMED])
    more = f" and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
    return (
        f"{len(skipped)} unreadable {what} image(s) in {name}: {named}{more}. The ground truth refers to images "
        "by position, so every query and database image must be readable"
    )
