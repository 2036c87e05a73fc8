"""ONNX export: parity with PyTorch across batch sizes and image sizes, metadata, atomic writes."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from models import Encoder, load_encoder
from serving.export import PARITY_THRESHOLD, ExportError, check_onnx_parity, export_onnx
from serving.onnx_metadata import ONNX_FORMAT, REQUIRED_KEYS, OnnxMetadataError, parse_onnx_metadata, read_onnx_metadata


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, height, width, generator=generator)


@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 32, 32), (3, 32, 32), (1, 64, 64), (3, 64, 64), (2, 48, 80)],
)
def test_onnx_matches_pytorch_at_any_batch_and_image_size(tiny_checkpoint, serving_onnx, batch, height, width):
    encoder = load_encoder(tiny_checkpoint)
    cosine = check_onnx_parity(encoder, serving_onnx, _images(batch, height, width, seed=batch * 100 + height))
    assert cosine >= PARITY_THRESHOLD


def test_parity_check_detects_a_different_model(other_checkpoint, serving_onnx):
    # The ONNX file holds the tiny checkpoint's weights; another encoder must not pass as its twin.
    cosine = check_onnx_parity(load_encoder(other_checkpoint), serving_onnx, _images(3, 32, 32, seed=0))
    assert cosine < 0.99


def test_graph_has_named_dynamic_axes_and_a_fixed_embedding_axis(serving_onnx, tiny_encoder_config):
    model = onnx.load(str(serving_onnx))
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert (inp.name, out.name) == ("images", "embeddings")
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 3, "height", "width"]
    assert out_dims == ["batch", tiny_encoder_config.embedding_dim]


def test_metadata_round_trip(tiny_checkpoint, serving_onnx):
    encoder = load_encoder(tiny_checkpoint)
    props = {p.key: p.value for p in onnx.load(str(serving_onnx)).metadata_props}
    assert set(REQUIRED_KEYS) <= set(props)
    assert props["format"] == ONNX_FORMAT
    assert json.loads(props["mean"]) == pytest.approx(list(encoder.config.preprocess.mean))
    assert json.loads(props["levels"]) == encoder.config.levels
    assert json.loads(props["encoder_config"])["backbone"] == "resnet10t"

    info = read_onnx_metadata(serving_onnx)
    assert info.encoder_id == encoder.encoder_id
    assert info.teacher_id is None
    assert info.embedding_dim == encoder.config.embedding_dim
    assert info.preprocess == encoder.config.preprocess
    assert info.levels == tuple(encoder.config.levels)


def test_metadata_parser_names_the_file_and_the_missing_keys():
    with pytest.raises(OnnxMetadataError, match=r"model\.onnx lacks .*embedding_dim"):
        parse_onnx_metadata({"format": ONNX_FORMAT, "encoder_id": "x"}, "model.onnx")
    props = {key: "1" for key in REQUIRED_KEYS} | {"format": ONNX_FORMAT, "mean": "not json"}
    with pytest.raises(OnnxMetadataError, match="malformed"):
        parse_onnx_metadata(props, "model.onnx")


def test_export_refuses_an_encoder_without_id_and_writes_nothing(tiny_encoder_config, tmp_path):
    target = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="no encoder_id"):
        export_onnx(Encoder(tiny_encoder_config), target)
    assert list(tmp_path.iterdir()) == []


def test_export_leaves_only_the_final_file(serving_onnx):
    # The temporary file is renamed into place: no ``.encoder.onnx.tmp-*`` is left beside it.
    assert sorted(p.name for p in serving_onnx.parent.iterdir()) == ["encoder.onnx"]


def test_torchscript_exporter_and_replacing_an_existing_file(tiny_checkpoint, tmp_path):
    target = tmp_path / "encoder.onnx"
    target.write_bytes(b"an older export")
    exported = export_onnx(tiny_checkpoint, target, exporter="torchscript", example_size=48)
    assert exported.path == target and exported.exporter == "torchscript" and exported.min_cosine >= 0.9999
    encoder = load_encoder(tiny_checkpoint)
    assert check_onnx_parity(encoder, target, _images(2, 40, 56, seed=9)) >= PARITY_THRESHOLD
    assert read_onnx_metadata(target).encoder_id == encoder.encoder_id
    out_dims = [d.dim_param or d.dim_value for d in onnx.load(str(target)).graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 32]
    with pytest.raises(ExportError, match="unknown exporter"):
        export_onnx(encoder, target, exporter="tflite")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]
