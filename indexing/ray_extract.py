"""Gallery extraction on Ray Data: the same chunk files as ``indexing.extract_job``, embedded by a pool of actors.

One machine's extraction is bounded by its cores or its GPU. :func:`extract_gallery_ray` spreads the same
work over a Ray cluster (or the local machine's cores) and writes the *same* extraction directory: same
chunking, same spec, same rows and skip reports, resumable in the same way, so ``combine_stores`` and
``index_embeddings`` build exactly the index a local run would. A run may even be started locally and
finished on Ray, or the reverse.

The pipeline is one Ray Dataset whose rows are the extraction batches of the missing chunks (batches are cut
inside chunks exactly as ``indexing.extract.extract_to_store`` cuts them, so each batch holds the same images):

1. *decode* (``map_batches`` on a plain function): the images of one batch read and prepared by the local
   pipeline's own code (``SkipCorrupt`` with the encoder's ``build_transforms``, then ``collate_skipping``),
   unreadable ones listed with their reason;
2. *embed* (``map_batches`` on an actor pool): each actor loads the encoder once from its checkpoint
   (``models.checkpoint.load_encoder``) and runs it, on one GPU per actor where the cluster has GPUs,
   else on one CPU core per actor.

On CPU actors the decode step asks for the actor's cores, so Ray Data fuses it into the actor (it fuses only
steps with equal resources) and every actor decodes and embeds its own batches; unfused, decode tasks would
wait for ever for cores the actors hold. On GPU actors the steps stay apart: decoding runs as CPU tasks on
the cores the GPU actors leave free, feeding the GPUs through the object store. The driver collects the
batches as they arrive, in any order, and writes each chunk (atomically, via ``EmbeddingStore.write_chunk``)
once its last batch is in.

Every worker reads the images and the checkpoint by path: on a cluster both must be on storage that every
node sees at the same path (a shared filesystem). Ray is an optional dependency
(``pip install "retrieval-engine[distributed]"``), imported only when this runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from indexing.embedding_store import SPEC_FILE, EmbeddingStore, ExtractionMismatchError, ExtractionSpec
from indexing.errors import IndexFormatError
from indexing.extract import ChunkBuffer, StoreRun, embed_images, progress_bar
from indexing.extract_job import ExtractOptions, extraction_spec
from models.checkpoint import load_encoder, read_checkpoint_info
from models.encoder import Encoder, eval_mode
from retrieval.config import ConfigError
from retrieval.data.datasets import DatasetError
from retrieval.data.gallery import Gallery
from retrieval.data.skipping import SkipCorrupt, collate_skipping
from retrieval.data.transforms import PreprocessConfig, build_transforms

__all__ = [
    "RAY_INSTALL_HINT",
    "RayUnavailableError",
    "RayWorkers",
    "extract_gallery_ray",
    "plan_workers",
]

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = 'pip install "retrieval-engine[distributed]"'
#: Most input blocks the batch plan is cut into (each block is one scheduling unit for Ray Data).
MAX_BLOCKS = 4096


class RayUnavailableError(ConfigError):
    """``--engine ray`` where Ray (with Ray Data) is not installed."""


@dataclass(frozen=True)
class RayWorkers:
    """The actor pool an extraction runs on.

    Attributes:
        actors: encoder actors (each loads the encoder once).
        gpus_per_actor: 1 on GPU actors, 0 on CPU actors.
        cpus_per_actor: CPU cores reserved per actor: a CPU actor's torch threads; on a GPU actor 1 for feeding
            the GPU, or 0 where the cluster has too few cores to also leave some to decoding.
    """

    actors: int
    gpus_per_actor: int
    cpus_per_actor: int

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor else "cpu"

    @property
    def decode_cpus(self) -> int:
        """Cores a decoding step asks for.

        On CPU actors the same as the actor, so that Ray Data fuses decoding into the actor (it fuses only
        steps with equal resources): otherwise decode tasks would wait for cores the actors hold, for ever.
        On GPU actors one core per decode task, the cluster's cores that the GPU actors leave free.
        """
        return 1 if self.gpus_per_actor else self.cpus_per_actor

    def describe(self) -> str:
        kind = "GPU" if self.gpus_per_actor else "CPU"
        return f"--engine ray: PyTorch in {self.actors} Ray {kind} actor{'s' if self.actors != 1 else ''}"


def plan_workers(
    device: str | torch.device, cluster: dict[str, float], num_actors: int | None = None, cpus_per_actor: int = 1
) -> RayWorkers:
    """Decide the actor pool from the requested device and the cluster's resources (``ray.cluster_resources()``).

    ``cpu`` gives CPU actors; ``auto`` gives GPU actors when the cluster has GPUs, else CPU actors; ``cuda``
    (or ``cuda:N``: each actor gets a whole GPU of its own) requires GPUs. By default there is one actor per
    GPU, or one per ``cpus_per_actor`` cores of the cluster.

    Raises:
        ConfigError: an unknown device, ``cuda`` on a cluster without GPUs, or a non-positive actor count.
    """
    if num_actors is not None and num_actors < 1:
        raise ConfigError(f"the number of Ray actors must be at least 1, got {num_actors}")
    if cpus_per_actor < 1:
        raise ConfigError(f"CPUs per Ray actor must be at least 1, got {cpus_per_actor}")
    name = str(device)
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 0))
    if name == "auto":
        use_gpu = gpus > 0
    elif name == "cpu":
        use_gpu = False
    elif name == "cuda" or name.startswith("cuda:"):
        if gpus == 0:
            raise ConfigError(f"device {name!r} was requested but the Ray cluster has no GPU; use cpu or auto")
        use_gpu = True
    else:
        raise ConfigError(f"unknown device {name!r} for --engine ray; use cpu, cuda or auto")
    if use_gpu:
        actors = num_actors or gpus
        return RayWorkers(actors, 1, 1 if cpus >= 2 * actors else 0)
    return RayWorkers(num_actors or max(1, cpus // cpus_per_actor), 0, cpus_per_actor)


def extract_gallery_ray(
    encoder: Encoder,
    encoder_path: str | Path,
    gallery: Gallery,
    work_dir: str | Path,
    options: ExtractOptions,
    shard: tuple[int, int] = (0, 1),
    *,
    num_actors: int | None = None,
    cpus_per_actor: int = 1,
    address: str | None = None,
) -> tuple[EmbeddingStore, StoreRun]:
    """Embed (the ``shard`` slice of) ``gallery`` into ``work_dir`` on Ray; the contract of ``extract_gallery``.

    Joins the Ray session of this process if there is one, else ``ray.init(address)`` (``None``: the cluster
    named by ``RAY_ADDRESS``, or a new one on this machine), which it shuts down again at the end.

    Args:
        encoder: the loaded encoder (its id and preprocessing); the actors load their own copy from ``encoder_path``.
        encoder_path: its checkpoint directory, readable at that path by every Ray worker.
        gallery: the images; their paths must be readable by every Ray worker.
        work_dir: the extraction directory (created, or continued when it holds the same job).
        options: batch and chunk sizes, device (``cpu``, ``cuda``, ``auto``), AMP, progress, restart; the
            runtime must be ``torch`` or ``auto`` (actors run PyTorch); ``num_workers`` is unused (Ray decodes).
        shard: slice ``(I, N)`` of the chunks, as for ``extract_gallery``.
        num_actors: encoder actors; default one per GPU, or one per ``cpus_per_actor`` cores of the cluster.
        cpus_per_actor: cores (torch threads) per CPU actor.
        address: the Ray cluster to join when no session is running.

    Returns:
        The store and what this run did, as ``extract_gallery`` returns them.

    Raises:
        RayUnavailableError: Ray Data is not installed.
        ConfigError: ``--runtime onnx``, a bad device or actor count.
        ExtractionMismatchError: ``work_dir`` holds another job's chunks (without ``options.restart``), or
            ``encoder`` is not the checkpoint at ``encoder_path``.
    """
    ray = _import_ray()
    if len(gallery) == 0:
        raise DatasetError("cannot index an empty gallery")
    if options.runtime == "onnx":
        raise ConfigError("--engine ray runs the encoder in PyTorch; use --runtime torch or auto with it")
    on_disk = read_checkpoint_info(encoder_path).encoder_id
    if on_disk != str(encoder.encoder_id):
        raise ExtractionMismatchError(f"{encoder_path} holds encoder {on_disk}, not the given {encoder.encoder_id}")
    spec = extraction_spec(encoder, encoder_path, gallery, options, shard)
    if not options.restart:
        _refuse_onnx_resume(work_dir, spec)
    store = EmbeddingStore.open_for(work_dir, spec, restart=options.restart)
    missing = store.missing_chunks()
    chunks_before = len(spec.chunk_numbers()) - len(missing)
    if chunks_before:
        logger.info("resumed %s: %d chunks were already embedded", work_dir, chunks_before)
    start = time.perf_counter()
    if not missing:
        return store, StoreRun(chunks_before, 0, 0, 0, 0.0, "torch", "--engine ray: every chunk was already embedded")
    with _ray_session(ray, address), _quiet_ray_data(ray):
        plan = _batch_plan(spec, missing)
        workers = plan_workers(options.device, ray.cluster_resources(), num_actors, cpus_per_actor)
        workers = replace(workers, actors=min(workers.actors, len(plan)))  # an actor without a batch costs its start
        logger.info("%s embedding %d chunks into %s", workers.describe(), len(missing), store)
        dataset = _pipeline(ray, plan, gallery, encoder, encoder_path, options, workers)
        collector = _ChunkCollector(store, gallery, missing)
        completed = spec.positions() - sum(len(spec.chunk_positions(c)) for c in missing)
        with progress_bar(spec.positions(), options.progress, completed=completed) as advance:
            for row in dataset.iter_rows():
                collector.add(row)
                advance(int(row["stop"]) - int(row["start"]))
    if collector.unfinished():
        raise RuntimeError(f"Ray Data returned no results for chunks {collector.unfinished()} of {store}")
    seconds = time.perf_counter() - start
    run = StoreRun(chunks_before, len(missing), collector.embedded, collector.skipped, seconds, "torch")
    return store, replace(run, runtime_reason=workers.describe())


def _refuse_onnx_resume(work_dir: str | Path, spec: ExtractionSpec) -> None:
    """An extraction started by ONNX Runtime (locally) cannot be continued by PyTorch actors: say so plainly."""
    if not (Path(work_dir) / SPEC_FILE).is_file():
        return
    try:
        existing = EmbeddingStore.open(work_dir).spec
    except IndexFormatError:
        return  # open_for reports it
    if existing.runtime == "onnx" and not existing.resume_differences(spec.model_copy(update={"runtime": "onnx"})):
        raise ExtractionMismatchError(
            f"{work_dir} holds an extraction embedded by ONNX Runtime; --engine ray runs PyTorch, whose vectors "
            "differ in the last bits: finish it with --engine local, or pass --restart to embed it all again on Ray"
        )


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # Ray without its data extra has no ray.data
    except ImportError as exc:
        raise RayUnavailableError(
            f"--engine ray needs Ray Data, which is not installed ({exc}); install it with: {RAY_INSTALL_HINT}"
        ) from None
    return ray


@contextlib.contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """The running Ray session, or a new one (joined or started) that is shut down afterwards."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """No Ray Data progress bars or start banners while ours runs (two bars on one terminal garble each other)."""
    context = ray.data.DataContext.get_current()
    previous = context.enable_progress_bars, context.print_on_execution_start
    context.enable_progress_bars = context.print_on_execution_start = False
    try:
        yield
    finally:
        context.enable_progress_bars, context.print_on_execution_start = previous


def _batch_plan(spec: ExtractionSpec, chunks: list[int]) -> list[dict[str, int]]:
    """The extraction batches of ``chunks``, cut inside each chunk as ``extract_to_store`` cuts them."""
    plan = []
    for chunk in chunks:
        positions = spec.chunk_positions(chunk)
        for first in range(positions.start, positions.stop, spec.batch_size):
            plan.append({"chunk": chunk, "start": first, "stop": min(first + spec.batch_size, positions.stop)})
    return plan


def _pipeline(
    ray: Any,
    plan: list[dict[str, int]],
    gallery: Gallery,
    encoder: Encoder,
    encoder_path: str | Path,
    options: ExtractOptions,
    workers: RayWorkers,
) -> Any:
    """The lazy Ray Dataset: one row per batch -> decoded batch -> embedded batch."""
    # One block per batch spreads the batches evenly over the actors; past MAX_BLOCKS a block holds several.
    batches = ray.data.from_items(plan, override_num_blocks=min(len(plan), MAX_BLOCKS))
    decoded = batches.map_batches(
        decode_batch,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"gallery": ray.put(gallery), "preprocess": encoder.config.preprocess},
        num_cpus=workers.decode_cpus,
    )
    return decoded.map_batches(
        EncoderActor,
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs={
            "encoder_path": str(Path(encoder_path).resolve()),
            "encoder_id": str(encoder.encoder_id),
            "device": workers.device,
            "amp": options.amp,
            "threads": max(1, workers.cpus_per_actor),
        },
        compute=ray.data.ActorPoolStrategy(size=workers.actors),
        num_cpus=workers.cpus_per_actor,
        num_gpus=workers.gpus_per_actor,
    )


def decode_batch(batch: dict[str, np.ndarray], gallery: Any, preprocess: PreprocessConfig) -> dict[str, Any]:
    """Read and prepare one extraction batch (a one-row Ray batch) with the local pipeline's own code.

    ``SkipCorrupt`` + ``collate_skipping`` are what the local DataLoader runs on the same positions, so the
    tensors, the kept positions and the skip reasons are the local ones. ``gallery`` is the Ray object
    reference of the gallery (see :func:`_fetch_gallery`).
    """
    first, stop = int(batch["start"][0]), int(batch["stop"][0])
    source = SkipCorrupt(_fetch_gallery(gallery), build_transforms(preprocess, train=False))
    indices, images, skipped = collate_skipping([source[i] for i in range(first, stop)])
    if images is None:  # every image of the batch unreadable: nothing to embed
        images = torch.zeros((0, 3, 1, 1))
    return {
        "chunk": batch["chunk"],
        "start": batch["start"],
        "stop": batch["stop"],
        "positions": indices.numpy().astype(np.int64)[None],
        "images": images.numpy()[None],
        "skipped": np.array([json.dumps(skipped)]),
    }


#: The gallery this worker process fetched last, by object id.
_FETCHED: dict[str, Gallery] = {}


def _fetch_gallery(ref: Any) -> Gallery:
    """The gallery behind ``ref``, unpickled once per worker process rather than once per batch.

    Ray reuses a worker process for many decode tasks, and a million-item gallery (names, labels, metadata)
    takes a good fraction of a second to unpickle: far too much to pay for every batch of 64 images.
    """
    import ray

    key = ref.hex()
    if key not in _FETCHED:
        _FETCHED.clear()
        _FETCHED[key] = ray.get(ref)
    return _FETCHED[key]


class EncoderActor:
    """A Ray actor holding the encoder: loaded once from its checkpoint, then run on each decoded batch.

    Args:
        encoder_path: the checkpoint directory (as every worker sees it).
        encoder_id: the encoder the driver's spec names; a different checkpoint at that path is refused.
        device: ``cuda`` (the GPU Ray gave this actor) or ``cpu``.
        amp: float16 autocast on CUDA, as the local pipeline does.
        threads: torch intra-op threads (the cores Ray reserved for this actor).

    Raises:
        ExtractionMismatchError: the checkpoint at ``encoder_path`` is not ``encoder_id``.
    """

    def __init__(self, encoder_path: str, encoder_id: str, device: str, amp: bool, threads: int) -> None:
        if device == "cpu":
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.encoder = load_encoder(encoder_path, device=self.device)
        if str(self.encoder.encoder_id) != encoder_id:
            raise ExtractionMismatchError(
                f"the checkpoint at {encoder_path} on {os.uname().nodename} is encoder {self.encoder.encoder_id}, "
                f"not {encoder_id}: every Ray node must see the same checkpoint at that path"
            )
        self.amp = amp and self.device.type == "cuda"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images = torch.from_numpy(np.ascontiguousarray(batch["images"][0]))
        embeddings = self.embed(images)
        return {
            "chunk": batch["chunk"],
            "start": batch["start"],
            "stop": batch["stop"],
            "positions": batch["positions"],
            "embeddings": embeddings[None],
            "skipped": batch["skipped"],
        }

    def embed(self, images: torch.Tensor) -> np.ndarray:
        """``(n, D)`` float32 L2-normalised embeddings, computed as the local pipeline computes them."""
        if images.shape[0] == 0:
            return np.zeros((0, self.encoder.embedding_dim), np.float32)
        with eval_mode(self.encoder), torch.inference_mode():
            return embed_images(self.encoder, images, self.device, self.amp)


class _ChunkCollector:
    """Embedded batches, arriving in any order, gathered per chunk; a chunk is written when its last batch is in."""

    def __init__(self, store: EmbeddingStore, gallery: Gallery, chunks: list[int]) -> None:
        self.store = store
        self.gallery = gallery
        spec = store.spec
        self.expected = {c: -(-len(spec.chunk_positions(c)) // spec.batch_size) for c in chunks}
        self.pending: dict[int, dict[int, tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]] = {}
        self.embedded = self.skipped = 0

    def add(self, row: dict[str, Any]) -> None:
        chunk, first = int(row["chunk"]), int(row["start"])
        positions = np.asarray(row["positions"], dtype=np.int64).reshape(-1)
        embeddings = np.asarray(row["embeddings"], dtype=np.float32).reshape(len(positions), self.store.spec.dim)
        skipped = [(int(i), str(reason)) for i, reason in json.loads(str(row["skipped"]))]
        batches = self.pending.setdefault(chunk, {})
        batches[first] = (positions, embeddings, skipped)
        self.embedded += len(positions)
        self.skipped += len(skipped)
        if len(batches) == self.expected[chunk]:
            self._write(chunk, [batches[start] for start in sorted(batches)])
            del self.pending[chunk]
            del self.expected[chunk]

    def _write(self, chunk: int, batches: list[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]) -> None:
        buffer = ChunkBuffer(self.gallery)
        for positions, embeddings, skipped in batches:
            buffer.add(positions, embeddings, skipped)
        buffer.write(self.store, chunk)

    def unfinished(self) -> list[int]:
        return sorted(self.expected)
