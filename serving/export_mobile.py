"""The mobile export: a static ``(1, 3, S, S)`` uint8-input int8 model for phones, checked against float32.

Steps, each checked before the next:

1. the verified float export (``serving.export.export_onnx``, parity with PyTorch);
2. its uint8-input front (``serving.mobile_graph``): the graph casts, scales by 1/255 and normalises itself,
   so an app only decodes and resizes; this float32 graph must reproduce the float export on real images
   prepared by ``retrieval.data.preprocess.to_uint8_chw`` (cosine >= ``PARITY_THRESHOLD``);
3. static int8 quantisation (``serving.quantize_int8``: QDQ, per-channel) calibrated on images from a folder,
   CSV or path list (``serving.calibration_images``), and its ORT-format copy beside it (same stem, ``.ort``);
4. the agreement check on held-out images (``serving.mobile_agreement``): mean cosine int8 vs float32 and the
   top-10 overlap of a sample search must reach ``min_cosine`` and ``min_overlap``; size and batch-1 latency
   are measured and reported beside them.

Both files are checksummed (``serving.model_checksum``): the ``.onnx`` carries its own ``file_sha256``, sealed
before the ORT copy is made; the ``.ort`` gets a ``<file>.ort.sha256`` sidecar, written as it is published.

Only then are the ``.onnx`` and ``.ort`` files renamed into place: an export that fails a check leaves nothing
new at ``out_path``. The metadata is the float export's with ``input_format: uint8_rgb`` and ``precision: int8``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.data.preprocess import normalise_array
from serving.calibration_images import load_calibration_split
from serving.export import PARITY_THRESHOLD, ExportError, export_onnx, seal_checksum
from serving.export_files import publish, staged_file
from serving.mobile_agreement import embed_each, interleaved_latency_ms, measure_agreement, row_cosines
from serving.mobile_graph import MOBILE_INPUT_NAME, uint8_input_model
from serving.model_checksum import CHECKSUM_KEY, PLACEHOLDER, write_checksum_sidecar
from serving.onnx_metadata import read_onnx_metadata, update_onnx_metadata
from serving.quantize_int8 import quantize_int8, save_ort_format

if TYPE_CHECKING:
    from models.encoder import Encoder

__all__ = [
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_OVERLAP",
    "ORT_PARITY_THRESHOLD",
    "MobileExport",
    "export_onnx_mobile",
    "ort_path_for",
]

logger = logging.getLogger(__name__)

#: Default floor of the mean cosine between int8 and float32 embeddings of held-out images.
DEFAULT_MIN_COSINE = 0.98
#: Default floor of the mean top-10 overlap of the sample search.
DEFAULT_MIN_OVERLAP = 0.8
#: The ORT-format copy must give the same embeddings as the int8 ``.onnx`` (its kernels may fuse QDQ pairs).
ORT_PARITY_THRESHOLD = 0.999


@dataclass(frozen=True)
class MobileExport:
    """A written mobile export and what was measured on it (ratios are int8 / float32).

    Attributes:
        path: the int8 ``.onnx`` file; ``ort_path``: its ORT-format copy.
        encoder_id: the exported encoder.
        input_size: side S of the ``(1, 3, S, S)`` uint8 input.
        calibration_images: images the quantiser was calibrated on; ``agreement_images``: held-out images checked.
        skipped: ``(file, reason)`` of each unreadable image.
        fp32_bytes, int8_bytes, ort_bytes: file sizes of the float32 mobile graph, the int8 ``.onnx`` and ``.ort``.
        fp32_ms, int8_ms: median batch-1 latency (ONNX Runtime, CPU, ``threads`` intra-op threads).
        mean_cosine, min_cosine: int8 vs float32 embeddings of the held-out images.
        k, top_k_overlap: the sample search (int8 vs float32 queries over float32-embedded held-out images).
        fp32_parity: worst cosine of the float export vs PyTorch; ``front_parity``: of the uint8-input float32 graph
            vs the float export; ``ort_parity``: of the ``.ort`` copy vs the int8 ``.onnx``.
        thresholds: the ``min_cosine`` and ``min_overlap`` the export had to reach.
    """

    path: Path
    ort_path: Path
    encoder_id: str
    input_size: int
    calibration_images: int
    agreement_images: int
    fp32_bytes: int
    int8_bytes: int
    ort_bytes: int
    fp32_ms: float
    int8_ms: float
    latency_repeats: int
    threads: int
    mean_cosine: float
    min_cosine: float
    k: int
    top_k_overlap: float
    fp32_parity: float
    front_parity: float
    ort_parity: float
    thresholds: dict[str, float]
    exporter: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes

    @property
    def latency_ratio(self) -> float:
        return self.int8_ms / self.fp32_ms

    def as_dict(self) -> dict[str, Any]:
        """Every field plus the two ratios, JSON-ready."""
        data = asdict(self) | {"size_ratio": self.size_ratio, "latency_ratio": self.latency_ratio}
        data["path"], data["ort_path"] = str(self.path), str(self.ort_path)
        data["skipped"] = [list(item) for item in self.skipped]
        return data


def ort_path_for(onnx_path: str | Path) -> Path:
    """Where the ORT-format copy of a mobile export goes: beside it, same stem, ``.ort``."""
    return Path(onnx_path).with_suffix(".ort")


def export_onnx_mobile(
    encoder: Encoder | str | Path,
    out_path: str | Path,
    calibration_images: str | Path,
    calibration_count: int = 100,
    agreement_count: int = 100,
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_overlap: float = DEFAULT_MIN_OVERLAP,
    latency_repeats: int = 20,
    threads: int = 1,
    opset: int = 18,
) -> MobileExport:
    """Export ``encoder`` as a uint8-input int8 model (``.onnx`` + ``.ort``) and check it against float32.

    Args:
        encoder: an ``Encoder`` with an id, or a checkpoint directory.
        out_path: the ``.onnx`` file; the ORT-format copy goes to ``ort_path_for(out_path)``.
        calibration_images: a folder, CSV or path list (``open_gallery``) of representative photos.
        calibration_count: images that calibrate the quantiser.
        agreement_count: further images held out for the agreement check (at least 11).
        min_cosine: floor of the mean int8/float32 cosine on held-out images.
        min_overlap: floor of the mean top-10 overlap of the sample search.
        latency_repeats: timed batch-1 runs per model (median reported).
        threads: ONNX Runtime intra-op threads for the latency and agreement runs (phones run one or a few).
        opset: ONNX opset of the float export.

    Raises:
        ExportError: invalid thresholds, a failed export or conversion, or a check below its threshold (the
            message gives the numbers); nothing is written at ``out_path`` then.
        serving.calibration_images.CalibrationError: too few readable images.
    """
    import onnx

    _check_thresholds(min_cosine, min_overlap, latency_repeats, threads)
    out_path = Path(out_path)
    ort_path = ort_path_for(out_path)
    if ort_path == out_path:
        raise ExportError(f"{out_path}: give the mobile export an .onnx name; its ORT copy is written as {ort_path}")
    with tempfile.TemporaryDirectory(prefix="retrieval-mobile-") as work_dir:
        work = Path(work_dir)
        fp32 = export_onnx(encoder, work / "float.onnx", opset=opset)
        info = read_onnx_metadata(fp32.path)
        pre = info.preprocess
        split = load_calibration_split(calibration_images, pre, calibration_count, agreement_count)
        front = work / "mobile_fp32.onnx"
        try:
            onnx.save(uint8_input_model(onnx.load(str(fp32.path)), pre), str(front))
        except ValueError as exc:
            raise ExportError(f"cannot build the uint8-input mobile graph: {exc}") from exc
        front_parity = _front_parity(fp32.path, front, split.held_out, pre, threads)
        if not front_parity >= PARITY_THRESHOLD:
            raise ExportError(
                f"the uint8-input graph does not reproduce the float export: minimum cosine {front_parity:.6f} < "
                f"{PARITY_THRESHOLD}"
            )
        quantised = work / "mobile_int8.onnx"
        try:
            quantize_int8(front, quantised, MOBILE_INPUT_NAME, (image[None] for image in split.calibration))
        except Exception as exc:  # onnxruntime.quantization raises plain exceptions of many kinds
            raise ExportError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from exc
        model = onnx.load(str(quantised))
        updates = {"input_format": "uint8_rgb", "precision": "int8", CHECKSUM_KEY: PLACEHOLDER}
        update_onnx_metadata(model, updates, str(out_path))
        onnx.save(model, str(quantised))
        seal_checksum(quantised)
        with staged_file(out_path, ".onnx") as tmp_onnx, staged_file(ort_path, ".ort") as tmp_ort:
            tmp_onnx.write_bytes(quantised.read_bytes())
            save_ort_format(tmp_onnx, tmp_ort)
            report = _measure(front, tmp_onnx, tmp_ort, split.held_out, latency_repeats, threads)
            result = MobileExport(
                path=out_path,
                ort_path=ort_path,
                encoder_id=info.encoder_id,
                input_size=pre.input_size,
                calibration_images=len(split.calibration),
                agreement_images=len(split.held_out),
                fp32_bytes=front.stat().st_size,
                int8_bytes=tmp_onnx.stat().st_size,
                ort_bytes=tmp_ort.stat().st_size,
                latency_repeats=latency_repeats,
                threads=threads,
                fp32_parity=fp32.min_cosine,
                front_parity=front_parity,
                thresholds={"min_cosine": min_cosine, "min_overlap": min_overlap},
                exporter=fp32.exporter,
                skipped=split.skipped,
                **report,
            )
            _enforce(result, min_cosine, min_overlap)
            publish(tmp_ort, ort_path)
            write_checksum_sidecar(ort_path)
            publish(tmp_onnx, out_path)
    logger.info(
        "exported encoder %s for mobile to %s (int8; mean cosine %.4f, top-%d overlap %.3f)",
        result.encoder_id,
        out_path,
        result.mean_cosine,
        result.k,
        result.top_k_overlap,
    )
    return result


def _check_thresholds(min_cosine: float, min_overlap: float, latency_repeats: int, threads: int) -> None:
    if not -1.0 <= min_cosine <= 1.0:
        raise ExportError(f"--min-cosine must be a cosine in [-1, 1], got {min_cosine}")
    if not 0.0 <= min_overlap <= 1.0:
        raise ExportError(f"--min-overlap must be a fraction in [0, 1], got {min_overlap}")
    if latency_repeats < 1 or threads < 1:
        raise ExportError(f"latency repeats and threads must be at least 1, got {latency_repeats} and {threads}")


def _session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session; every model compared gets the same options."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _front_parity(float_path: Path, front_path: Path, images: list[np.ndarray], pre: Any, threads: int) -> float:
    """Worst cosine between the float export on normalised images and the uint8-input graph on the pixels."""
    float_session = _session(float_path, threads)
    sample = images[: min(len(images), 16)]
    reference = float_session.run(None, {float_session.get_inputs()[0].name: normalise_array(np.stack(sample), pre)})[0]
    return float(row_cosines(reference, embed_each(_session(front_path, threads), sample)).min())


def _measure(
    fp32_path: Path, int8_path: Path, ort_path: Path, held_out: list[np.ndarray], repeats: int, threads: int
) -> dict[str, Any]:
    """Agreement on the held-out images, ORT-copy parity, and interleaved batch-1 latency of both models."""
    fp32_session, int8_session = _session(fp32_path, threads), _session(int8_path, threads)
    try:
        ort_session = _session(ort_path, threads)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"ONNX Runtime cannot load the ORT-format copy {ort_path}: {exc}") from exc
    reference = embed_each(fp32_session, held_out)
    quantised = embed_each(int8_session, held_out)
    agreement = measure_agreement(reference, quantised, k=10)
    ort_parity = float(row_cosines(quantised, embed_each(ort_session, held_out)).min())
    if not ort_parity >= ORT_PARITY_THRESHOLD:
        raise ExportError(
            f"the ORT-format copy disagrees with the int8 .onnx: minimum cosine {ort_parity:.6f} < "
            f"{ORT_PARITY_THRESHOLD}"
        )
    feed = {MOBILE_INPUT_NAME: held_out[0][None]}
    ms = interleaved_latency_ms(
        {"fp32": lambda: fp32_session.run(None, feed), "int8": lambda: int8_session.run(None, feed)}, repeats
    )
    return {
        "fp32_ms": ms["fp32"],
        "int8_ms": ms["int8"],
        "mean_cosine": agreement.mean_cosine,
        "min_cosine": agreement.min_cosine,
        "k": agreement.k,
        "top_k_overlap": agreement.top_k_overlap,
        "ort_parity": ort_parity,
    }


def _enforce(result: MobileExport, min_cosine: float, min_overlap: float) -> None:
    failures = []
    if not result.mean_cosine >= min_cosine:  # also catches NaN
        failures.append(f"mean cosine {result.mean_cosine:.6f} < --min-cosine {min_cosine}")
    if not result.top_k_overlap >= min_overlap:
        failures.append(f"top-{result.k} overlap {result.top_k_overlap:.3f} < --min-overlap {min_overlap}")
    if failures:
        raise ExportError(
            f"the int8 mobile model of encoder {result.encoder_id} disagrees with float32 on "
            f"{result.agreement_images} held-out images: {'; '.join(failures)} (min cosine {result.min_cosine:.6f}, "
            f"calibrated on {result.calibration_images} images); nothing was written at {result.path}. Calibrate "
            "on more (or more representative) images with --calibration-count, or ship the float export"
        )
