"""The ONNX Runtime query encoder: an exported ``.onnx`` (or ORT-format ``.ort``) file, run without torch.

Preprocessing is Pillow + numpy (``retrieval.data.preprocess``) and batches are numpy arrays, so a
process that serves or searches with an exported model never imports torch (an import that costs
seconds per CLI call). The file's own metadata says how to feed it:

- ``input_format="float32_normalized"`` (``retrieval export --format onnx``): a normalised float batch,
  ``batch_size`` images per run (the batch axis is dynamic); ``precision="fp16"`` files keep float32
  inputs and outputs, so they need nothing special.
- ``input_format="uint8_rgb"`` (``--format onnx-mobile``): the resized RGB pixels as uint8, one image per
  run (the mobile graph has a static batch of 1 and normalises inside).

Opening a file verifies its checksum (``serving.model_checksum``): a damaged model that ONNX Runtime
still loads would otherwise answer every query wrongly or with NaN. An ``.onnx`` carries it in its
``file_sha256`` property; an ORT-format file is checked against a ``<file>.sha256`` sidecar, which the
mobile export writes (the ``file_sha256`` an ORT copy inherits describes the ``.onnx`` it came from, so
it is ignored). Files without a checksum (older exports, ORT copies made by hand) open with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.threads import compute_threads
from serving.model_checksum import CHECKSUM_KEY, verify_file, verify_sidecar
from serving.onnx_metadata import (
    OnnxEncoderInfo,
    OnnxMetadataError,
    parse_onnx_metadata,
    read_onnx_metadata,
)
from serving.runtimes.base import DEFAULT_BATCH_SIZE, RUNTIMES, QueryEncoderError, QueryEncoderRuntime, check_batch_size
from serving.runtimes.numpy_batches import chunks, finish_embeddings, model_inputs, pad_batch
from serving.runtimes.onnx_providers import ProviderSpec, resolve_providers

__all__ = ["ORT_FILE_IDENTIFIER", "OnnxRuntimeQueryEncoder", "is_ort_format"]

logger = logging.getLogger(__name__)

#: The flatbuffer file identifier of ORT-format models, stored at bytes 4..8 of the file.
ORT_FILE_IDENTIFIER = b"ORTM"
#: The output an export names; any other single-output model uses its first output.
_OUTPUT_NAME = "embeddings"
#: Whether ONNX Runtime's intra-op threads busy-wait for work between and after runs ("1", its default) or sleep.
#: A query server shares its cores with upload decoding, FAISS and the HTTP framework, which the spinning threads
#: starve: on the 2-core development machine (under load from other jobs) one 640x480 query took 71-80 ms end to
#: end without spinning against 106-122 ms with it, the encoder itself 61-67 ms against 88-107 ms
#: (``benchmarks/bench_query_stages.py``, 10k gallery, EfficientNet-B3 student at 300 px, runs alternated).
_ALLOW_SPINNING = "0"
#: ONNX Runtime's input type strings each input format may have.
_INPUT_TYPES: dict[str, dict[str, type[np.generic]]] = {
    "float32_normalized": {"tensor(float)": np.float32, "tensor(float16)": np.float16},
    "uint8_rgb": {"tensor(uint8)": np.uint8},
}


def is_ort_format(path: str | Path) -> bool:
    """Whether ``path`` is an ORT-format model (ONNX Runtime's flatbuffer format for mobile builds)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    return len(head) == 8 and head[4:8] == ORT_FILE_IDENTIFIER


@RUNTIMES.register("onnxruntime")
class OnnxRuntimeQueryEncoder(QueryEncoderRuntime):
    """An exported query encoder run in ONNX Runtime, with numpy preprocessing (no torch).

    Args:
        path: an ``.onnx`` file from ``retrieval export`` (float, fp16 or mobile), or its ORT-format copy.
        providers: execution providers in order of preference (names, ``PROVIDER_ALIASES`` such as
            ``"cuda"``, or ``(name, options)`` pairs); default CUDA when installed, then CPU. The TensorRT
            provider runs only when named here (see ``serving.runtimes.onnx_providers``).
        batch_size: images per ``session.run`` for models with a dynamic batch axis.
        threads: ONNX Runtime intra-op threads; default: ``--threads`` / ``RETRIEVAL_THREADS`` when set
            (``retrieval.threads``), else ONNX Runtime's choice (all cores).

    Raises:
        QueryEncoderError: missing file, a file ONNX Runtime cannot load, an input that does not match the
            metadata's ``input_format``, or no requested provider installed.
        serving.onnx_metadata.OnnxMetadataError: no valid query-encoder metadata in the file.
        serving.model_checksum.ModelChecksumError: the file's bytes do not match its checksum.
    """

    expects = "an .onnx file exported by `retrieval export` (with query-encoder metadata) or its ORT-format copy"

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[ProviderSpec] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.batch_size = check_batch_size(batch_size)
        if not self.path.is_file():
            problem = "is not a file" if self.path.exists() else "not found"
            raise QueryEncoderError(f"ONNX query encoder {self.path} {problem}")
        chosen = resolve_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        threads = compute_threads() if threads is None else threads
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", _ALLOW_SPINNING)
        # ONNX Runtime guesses the format from the ".ort" suffix; say it from the file's content instead.
        ort_format = is_ort_format(self.path)
        options.add_session_config_entry("session.load_model_format", "ORT" if ort_format else "ONNX")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own InvalidProtobuf/Fail/InvalidGraph types
            detail = " ".join(str(exc).split()).replace(str(self.path), self.path.name)
            raise QueryEncoderError(
                f"ONNX Runtime cannot load {self.path} (a damaged or truncated file, or not a model): {detail}"
            ) from exc
        props = self.session.get_modelmeta().custom_metadata_map
        if ort_format:
            verify_sidecar(self.path)
        else:
            verify_file(self.path, props.get(CHECKSUM_KEY))
        self.info: OnnxEncoderInfo = parse_onnx_metadata(props, str(self.path))
        self.encoder_id = self.info.encoder_id
        self.teacher_id = self.info.teacher_id
        self.dim = self.info.embedding_dim
        self.preprocess = self.info.preprocess
        self._input_name, self._input_dtype, self._static_batch = self._describe_input()
        outputs = [output.name for output in self.session.get_outputs()]
        self._output_name = _OUTPUT_NAME if _OUTPUT_NAME in outputs else outputs[0]
        self.providers: list[str] = list(self.session.get_providers())
        logger.info(
            "ONNX query encoder %s (%s, %s) runs on %s",
            self.path,
            self.info.input_format,
            self.info.precision,
            ", ".join(self.providers),
        )

    @classmethod
    def reject_reason(cls, path: Path) -> str | None:
        """``None`` for an ORT-format file or an ONNX file with our metadata (read with ``onnx``, no session)."""
        if not path.is_file():
            return "not a file"
        if is_ort_format(path):
            return None
        try:
            read_onnx_metadata(path)
        except OnnxMetadataError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot read it ({exc})"
        return None

    def _describe_input(self) -> tuple[str, type[np.generic], int | None]:
        """The input's name, numpy dtype and static batch size (``None`` when the batch axis is dynamic)."""
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise QueryEncoderError(f"{self.path} takes {len(inputs)} inputs ({names}); a query encoder takes one")
        (model_input,) = inputs
        allowed = _INPUT_TYPES[self.info.input_format]
        if model_input.type not in allowed:
            raise QueryEncoderError(
                f"{self.path}: its metadata says input_format {self.info.input_format!r}, which needs an input of "
                f"type {' or '.join(allowed)}, but input {model_input.name!r} is {model_input.type}; export it again"
            )
        batch_axis = model_input.shape[0] if model_input.shape else None
        static_batch = batch_axis if isinstance(batch_axis, int) and batch_axis > 0 else None
        return model_input.name, allowed[model_input.type], static_batch

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed PIL images as an ``(N, dim)`` float32 array of L2-normalised rows."""
        images = list(images)
        per_run = self._static_batch or self.batch_size
        parts = [self.infer(self.prepare(chunk), len(chunk)) for chunk in chunks(images, per_run)]
        return finish_embeddings(parts, len(images), self.dim, str(self.path))

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The model input for the images of one run (at most ``batch_size``), padded to a static batch.

        ``encode`` is ``prepare`` then ``infer`` per run; they are apart so that the query path's benchmark
        (``benchmarks/bench_query_stages.py``) can time the preprocessing and the network separately.
        """
        batch = model_inputs(images, self.preprocess, self.info.input_format, np.dtype(self._input_dtype))
        if self._static_batch is not None:
            batch = pad_batch(batch, self._static_batch)
        return batch

    def infer(self, batch: np.ndarray, count: int) -> np.ndarray:
        """Run the model on a ``prepare``d batch: the first ``count`` rows as ``(count, dim)`` L2-normalised float32."""
        (out,) = self.session.run([self._output_name], {self._input_name: batch})
        return finish_embeddings([out[:count]], count, self.dim, str(self.path))

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeQueryEncoder({str(self.path)!r}, encoder_id={self.encoder_id!r}, "
            f"input_format={self.info.input_format!r}, precision={self.info.precision!r}, "
            f"providers={self.providers!r})"
        )
