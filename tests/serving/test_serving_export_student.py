"""The AML student's layout (1x1 projection before GeM) and its ONNX export: parity, teacher id, unit outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models import Encoder, EncoderConfig, save_encoder
from models.heads import ConvProjectionHead, EmbeddingHead
from retrieval.data.transforms import PreprocessConfig
from serving.export import PARITY_THRESHOLD, OnnxExport, check_onnx_parity, export_onnx
from serving.onnx_metadata import read_onnx_metadata
from serving.runtimes import OnnxRuntimeQueryEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEACHER_ID = "0123456789abcdef"  # the form of an encoder id: 16 hex digits of the teacher's weights hash
DIM = 32
SIZE = 32


def _config(**overrides: object) -> EncoderConfig:
    """The smallest timm conv net that exports in seconds (resnet10t, 512 channels) at 32 px."""
    fields: dict = {"backbone": "resnet10t", "embedding_dim": DIM, "preprocess": PreprocessConfig(input_size=SIZE)}
    return EncoderConfig(**(fields | overrides))


def _student_config() -> EncoderConfig:
    return _config(projection="before_pooling", teacher_id=TEACHER_ID)


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Encoder:
    """A seeded random student, saved so it has an encoder id."""
    torch.manual_seed(0)
    encoder = Encoder(_student_config()).eval()
    save_encoder(encoder, tmp_path_factory.mktemp("student") / "encoder")
    return encoder


@pytest.fixture(scope="module")
def student_export(student, tmp_path_factory) -> OnnxExport:
    return export_onnx(student, tmp_path_factory.mktemp("student_onnx") / "student.onnx")


def test_before_pooling_projects_the_feature_map_with_a_1x1_conv():
    torch.manual_seed(0)
    encoder = Encoder(_student_config()).eval()
    channels = int(encoder.backbone.num_features)
    assert isinstance(encoder.head, ConvProjectionHead)
    assert isinstance(encoder.head.proj, nn.Conv2d)
    assert tuple(encoder.head.proj.weight.shape) == (DIM, channels, 1, 1)

    images = _images(3, SIZE, seed=0)
    with torch.no_grad():
        out = encoder(images)
        # Naive reference: conv on the map, GeM (p=3, eps clamp) over H and W, then L2.
        projected = F.conv2d(encoder.feature_map(images), encoder.head.proj.weight, encoder.head.proj.bias)
        p, eps = float(encoder.pooling.p), float(encoder.pooling.eps)
        pooled = projected.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        expected = pooled / pooled.norm(dim=1, keepdim=True)
    assert out.shape == (3, DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_default_projection_and_state_dict_keys_are_unchanged():
    config = _config()
    assert config.projection == "after_pooling"
    # A config written before the field existed (no "projection" key) still reads as the old layout.
    old_json = config.model_dump_json(exclude={"projection"})
    assert "projection" not in old_json
    assert EncoderConfig.model_validate_json(old_json).projection == "after_pooling"

    encoder = Encoder(config)
    assert isinstance(encoder.head, EmbeddingHead)
    state = encoder.state_dict()
    assert [key for key in state if not key.startswith("backbone.")] == [
        "pooling.p",
        "head.proj.weight",
        "head.proj.bias",
    ]
    assert tuple(state["head.proj.weight"].shape) == (DIM, int(encoder.backbone.num_features))
    assert set(state) == set(Encoder(_config(projection="after_pooling")).state_dict())


def test_student_exports_with_verified_parity(student_export):
    assert isinstance(student_export, OnnxExport)
    assert student_export.path.is_file()
    assert student_export.exporter in ("dynamo", "torchscript")
    assert student_export.min_cosine >= PARITY_THRESHOLD


def test_onnx_metadata_carries_the_teacher_id(student, student_export):
    info = read_onnx_metadata(student_export.path)
    assert info.teacher_id == TEACHER_ID
    assert info.encoder_id == student.encoder_id
    assert info.embedding_dim == DIM

    runtime = OnnxRuntimeQueryEncoder(student_export.path, providers=["CPUExecutionProvider"])
    assert (runtime.teacher_id, runtime.encoder_id, runtime.dim) == (TEACHER_ID, student.encoder_id, DIM)


@pytest.mark.parametrize("size", [SIZE, 2 * SIZE])
def test_onnx_embeddings_are_unit_vectors_matching_pytorch(student, student_export, size):
    images = _images(2, size, seed=size)
    assert check_onnx_parity(student, student_export.path, images) >= PARITY_THRESHOLD

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(student_export.path), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    assert out.shape == (2, DIM) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_query_encoder_over_the_export_returns_unit_rows(student_export):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(3)]
    vectors = OnnxRuntimeQueryEncoder(student_export.path, providers=["CPUExecutionProvider"]).encode(images)
    assert vectors.shape == (3, DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
