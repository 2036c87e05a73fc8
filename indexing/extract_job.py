"""One extraction job: a gallery embedded into an extraction directory, resuming what is already there.

``index build`` runs one over the whole gallery into ``OUT.extract``, ``index build --shard I/N`` one over a
slice into ``--out``, ``index add`` one over the new images; the index is built from the chunk files after.

The job also chooses what runs the encoder (:func:`choose_runtime`): PyTorch, or ONNX Runtime on CPU, where
the exported encoder embeds about twice as many images per second as eager PyTorch on the same cores
(``benchmarks/bench_extract.py``). The choice is recorded in the extraction spec, and a resumed run keeps it
(``indexing.embedding_store`` says why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from indexing.embedding_store import DEFAULT_CHUNK_SIZE, SPEC_FILE, EmbeddingStore, ExtractionSpec
from indexing.errors import IndexFormatError
from indexing.extract import BatchEmbedder, StoreRun, extract_to_store
from indexing.onnx_cache import OnnxExtractionError, gallery_onnx, onnxruntime_missing
from models.checkpoint import load_encoder
from models.devices import resolve_device
from models.encoder import Encoder
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError, LabelledImageDataset
from retrieval.data.gallery import Gallery, as_gallery

__all__ = [
    "AUTO_ONNX_MIN_IMAGES",
    "RUNTIMES",
    "ExtractOptions",
    "Runtime",
    "RuntimeChoice",
    "choose_runtime",
    "default_work_dir",
    "extract_gallery",
    "extract_shard",
    "extraction_spec",
]

logger = logging.getLogger(__name__)

Runtime = Literal["auto", "torch", "onnx"]
#: Valid ``--runtime`` values.
RUNTIMES: tuple[str, ...] = ("auto", "torch", "onnx")
#: ``auto`` exports to ONNX only for at least this many images to embed: the export and its parity check cost
#: ~8 s for a ResNet10-T at 224 px and ~1 min for GLAM-ResNet101 at 512 px on 2 CPU cores, which ONNX Runtime
#: wins back after roughly 300 and 30 images; below this count the whole extraction takes seconds either way.
AUTO_ONNX_MIN_IMAGES = 256


@dataclass(frozen=True)
class ExtractOptions:
    """How a gallery is embedded: batching, chunking into resumable files, device, workers and runtime.

    Attributes:
        batch_size: images per forward pass.
        chunk_size: gallery positions per chunk file (the unit of resuming and of sharding).
        device: where the encoder runs with the torch runtime (ONNX Runtime runs on the CPU).
        num_workers: DataLoader worker processes decoding images.
        amp: float16 autocast on CUDA.
        progress: progress bar with images/s and ETA.
        restart: discard an extraction directory left by a different job instead of refusing.
        runtime: ``torch``, ``onnx`` (the encoder exported and run by ONNX Runtime on CPU) or ``auto``
            (see :func:`choose_runtime`).
    """

    batch_size: int = 64
    chunk_size: int = DEFAULT_CHUNK_SIZE
    device: str | torch.device = "cpu"
    num_workers: int = 0
    amp: bool = True
    progress: bool = True
    restart: bool = False
    runtime: Runtime = "torch"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"batch size and chunk size must be positive, got {self.batch_size}, {self.chunk_size}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; valid: {', '.join(RUNTIMES)}")


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime an extraction uses and why (printed with the build summary).

    Attributes:
        runtime: ``torch`` or ``onnx``.
        reason: one sentence for the user.
        fallback: ``auto`` may fall back to torch when the export fails (an explicit choice may not).
    """

    runtime: Literal["torch", "onnx"]
    reason: str
    fallback: bool = False


def choose_runtime(
    requested: str, device: str | torch.device, images: int, previous: str | None = None
) -> RuntimeChoice:
    """Resolve ``--runtime`` for a job embedding ``images`` images on ``device``.

    ``auto`` continues with ``previous`` (the runtime of the extraction being resumed), else uses torch where
    a CUDA device is chosen, else ONNX Runtime on CPU when it is installed and there are at least
    ``AUTO_ONNX_MIN_IMAGES`` images to embed (below that the export costs more than it saves), else torch.

    Raises:
        ConfigError: an unknown runtime, or ``onnx`` with an explicit CUDA device (ONNX Runtime runs on CPU here).
    """
    if requested not in RUNTIMES:
        raise ConfigError(f"unknown runtime {requested!r}; valid: {', '.join(RUNTIMES)}")
    on_cuda = resolve_device(device).type == "cuda"
    if requested == "torch":
        return RuntimeChoice("torch", "--runtime torch")
    if requested == "onnx":
        if on_cuda and str(device) != "auto":
            raise ConfigError(
                f"--runtime onnx runs ONNX Runtime on the CPU; it cannot use --device {device}: pass --device cpu, "
                "or --runtime torch to extract on the GPU"
            )
        return RuntimeChoice("onnx", "--runtime onnx: the encoder exported to ONNX, run by ONNX Runtime on CPU")
    if previous in ("torch", "onnx"):
        return RuntimeChoice(previous, f"continuing an extraction embedded by {previous}")  # type: ignore[arg-type]
    if on_cuda:
        return RuntimeChoice("torch", "a CUDA device is used: PyTorch on the GPU")
    missing = onnxruntime_missing()
    if missing is not None:
        return RuntimeChoice("torch", f"no GPU, but ONNX Runtime is unavailable ({missing}): PyTorch on CPU")
    if images < AUTO_ONNX_MIN_IMAGES:
        return RuntimeChoice(
            "torch",
            f"{images} images to embed: too few for exporting the encoder to ONNX to pay off "
            f"(auto uses ONNX Runtime from {AUTO_ONNX_MIN_IMAGES}); PyTorch on CPU",
        )
    return RuntimeChoice(
        "onnx", "no GPU: the encoder exported to ONNX and run by ONNX Runtime on CPU (faster than PyTorch there)", True
    )


def default_work_dir(out_path: str | Path, suffix: str = "extract") -> Path:
    """Where ``build_index`` keeps its chunk files: ``OUT.extract`` beside the index (removed after success)."""
    out_path = Path(out_path)
    return out_path.parent / f"{out_path.name}.{suffix}"


def extract_gallery(
    encoder: Encoder,
    encoder_path: str | Path,
    gallery: Gallery,
    work_dir: str | Path,
    options: ExtractOptions,
    shard: tuple[int, int] = (0, 1),
) -> tuple[EmbeddingStore, StoreRun]:
    """Embed (the ``shard`` slice of) ``gallery`` into the extraction directory ``work_dir``, resuming it if present.

    With the onnx runtime the encoder is exported into ``work_dir`` first (reused when resuming, see
    ``indexing.onnx_cache``); under ``auto`` an encoder that cannot be exported falls back to torch.

    Raises:
        ExtractionMismatchError: ``work_dir`` holds another job's chunks and ``options.restart`` is off, or
            chunks embedded by another runtime than ``options.runtime``.
        indexing.onnx_cache.OnnxExtractionError: ``--runtime onnx`` where the encoder cannot run in ONNX Runtime.
    """
    if len(gallery) == 0:
        raise DatasetError("cannot index an empty gallery")
    spec = extraction_spec(encoder, encoder_path, gallery, options, shard)
    choice = choose_runtime(options.runtime, options.device, spec.positions(), _resumed_runtime(work_dir, spec))
    logger.info("extraction runtime %s: %s", choice.runtime, choice.reason)
    spec = spec.model_copy(update={"runtime": choice.runtime})
    store = EmbeddingStore.open_for(work_dir, spec, restart=options.restart)
    embedder = None
    if choice.runtime == "onnx" and store.missing_chunks():
        try:
            embedder = onnx_embedder(encoder, work_dir)
        except OnnxExtractionError as exc:
            if not choice.fallback:
                raise
            logger.warning("%s; falling back to PyTorch", exc)
            choice = RuntimeChoice("torch", f"auto: the encoder does not run in ONNX Runtime ({exc})")
            # A fresh auto choice (not a resumed one), so no chunk of this job exists yet: nothing is lost.
            store = EmbeddingStore.open_for(work_dir, spec.model_copy(update={"runtime": "torch"}), restart=True)
    run = extract_to_store(
        encoder,
        gallery,
        store,
        device="cpu" if choice.runtime == "onnx" else options.device,
        num_workers=options.num_workers,
        progress=options.progress,
        amp=options.amp,
        embedder=embedder,
    )
    run = replace(run, runtime=choice.runtime, runtime_reason=choice.reason)
    if run.chunks_before:
        logger.info("resumed %s: %d chunks were already embedded", work_dir, run.chunks_before)
    return store, run


def onnx_embedder(encoder: Encoder, work_dir: str | Path) -> BatchEmbedder:
    """The encoder's ONNX export in ``work_dir`` (made or reused) opened in an ONNX Runtime CPU session."""
    from indexing.onnx_embedder import OnnxGalleryEncoder

    export = gallery_onnx(encoder, work_dir)
    return OnnxGalleryEncoder(export.path, export.encoder_id, encoder.embedding_dim, encoder.config.preprocess)


def _resumed_runtime(work_dir: str | Path, spec: ExtractionSpec) -> str | None:
    """The runtime of the extraction in ``work_dir`` if ``spec`` would continue it, else ``None``."""
    if not (Path(work_dir) / SPEC_FILE).is_file():
        return None
    try:
        existing = EmbeddingStore.open(work_dir).spec
    except IndexFormatError:
        return None
    same_job = not existing.resume_differences(spec.model_copy(update={"runtime": existing.runtime}))
    return existing.runtime if same_job else None


def extract_shard(
    encoder_path: str | Path,
    dataset: LabelledImageDataset | Gallery,
    out_dir: str | Path,
    shard: tuple[int, int],
    options: ExtractOptions,
) -> StoreRun:
    """Embed slice ``shard = (I, N)`` of the gallery into the extraction directory ``out_dir`` (resumable).

    ``merge_shards`` later builds the index from all N directories.
    """
    device = "cpu" if options.runtime == "onnx" and str(options.device) == "auto" else options.device
    encoder = load_encoder(encoder_path, device=device)
    return extract_gallery(encoder, encoder_path, as_gallery(dataset), out_dir, options, shard)[1]


def extraction_spec(
    encoder: Encoder,
    encoder_path: str | Path,
    gallery: Gallery,
    options: ExtractOptions,
    shard: tuple[int, int],
    runtime: Literal["torch", "onnx"] = "torch",
) -> ExtractionSpec:
    """The ``extraction.json`` of a job: what a resume or a merge checks chunk files against.

    One function for every engine (``extract_gallery``, ``indexing.ray_extract``), so their chunk files are
    interchangeable: a job started by one continues with the other.
    """
    return ExtractionSpec(
        encoder_id=str(encoder.encoder_id),
        encoder_path=str(Path(encoder_path).resolve()),
        dim=encoder.embedding_dim,
        gallery_source=gallery.source,
        gallery_count=len(gallery),
        gallery_fingerprint=gallery.fingerprint(),
        levels=list(gallery.levels),
        chunk_size=options.chunk_size,
        batch_size=options.batch_size,
        shard_index=shard[0],
        num_shards=shard[1],
        runtime=runtime,
    )
