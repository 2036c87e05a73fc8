"""The float16 ONNX export: float32 I/O, float16 weights, float32 embedding tail, verified against float32."""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto
from typer.testing import CliRunner

from models import load_encoder
from retrieval.cli.main import app as cli
from serving.export import check_onnx_parity
from serving.export_fp16 import FP16_PARITY_THRESHOLD, export_onnx_fp16
from serving.onnx_graph import embedding_tail, topological_sort
from serving.onnx_metadata import read_onnx_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fp16_export(tiny_checkpoint, tmp_path_factory):
    return export_onnx_fp16(tiny_checkpoint, tmp_path_factory.mktemp("fp16") / "query.fp16.onnx")


def test_fp16_export_reproduces_pytorch_at_several_batches_and_sizes(tiny_checkpoint, fp16_export):
    assert fp16_export.min_cosine >= FP16_PARITY_THRESHOLD
    assert fp16_export.verified_on == "CPUExecutionProvider"
    encoder = load_encoder(tiny_checkpoint)
    generator = torch.Generator().manual_seed(5)
    for batch, height, width in [(1, 32, 32), (4, 32, 32), (2, 48, 80)]:
        images = torch.randn(batch, 3, height, width, generator=generator)
        assert check_onnx_parity(encoder, fp16_export.path, images) >= FP16_PARITY_THRESHOLD


def test_fp16_file_has_half_weights_float32_io_and_fp16_metadata(tiny_checkpoint, fp16_export):
    model = onnx.load(str(fp16_export.path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = {node.input[1] for node in model.graph.node if node.op_type == "Conv"}
    weight_types = {init.data_type for init in model.graph.initializer if init.name in conv_weights}
    assert weight_types == {TensorProto.FLOAT16}
    assert fp16_export.fp16_bytes < 0.55 * fp16_export.fp32_bytes
    info = read_onnx_metadata(fp16_export.path)
    assert (info.precision, info.input_format) == ("fp16", "float32_normalized")
    assert info.encoder_id == load_encoder(tiny_checkpoint).encoder_id
    onnx.checker.check_model(model)  # topologically sorted again after the converter's appended casts
    assert sorted(p.name for p in fp16_export.path.parent.iterdir()) == ["query.fp16.onnx"]


def test_embedding_tail_stays_float32_so_rows_are_unit_length(fp16_export):
    # Without the tail in float32 (and without dropping the converter's fp16 round trips) norms drift by ~1e-4.
    images = np.random.default_rng(0).standard_normal((6, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(fp16_export.path), providers=["CPUExecutionProvider"])
    embeddings = session.run(None, {"images": images})[0]
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=2e-6)
    model = onnx.load(str(fp16_export.path))
    tail = [node for node in model.graph.node if node.op_type in ("Pow", "ReduceMean", "ReduceL2", "Div", "Gemm")]
    fp16_initializers = {init.name for init in model.graph.initializer if init.data_type == TensorProto.FLOAT16}
    assert tail and not any(name in fp16_initializers for node in tail for name in node.input)


def test_embedding_tail_is_gem_head_and_norm_not_the_backbone(serving_onnx):
    graph = onnx.load(str(serving_onnx)).graph
    ops = {node.name: node.op_type for node in graph.node}
    tail = [ops[name] for name in embedding_tail(graph)]
    assert tail[0] == "Pow" and "Gemm" in tail and "ReduceL2" in tail and tail[-1] == "Div"
    assert "Conv" not in tail


def test_topological_sort_restores_a_shuffled_graph(serving_onnx):
    model = onnx.load(str(serving_onnx))
    original = [node.name for node in model.graph.node]
    nodes = list(model.graph.node)
    random.Random(0).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    topological_sort(model.graph)
    onnx.checker.check_model(model)
    assert sorted(node.name for node in model.graph.node) == sorted(original)


def test_cli_exports_fp16_with_json_numbers(tiny_checkpoint, tmp_path):
    out = tmp_path / "q16.onnx"
    result = CliRunner().invoke(
        cli, ["export", "--encoder", str(tiny_checkpoint), "--out", str(out), "--fp16", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["precision"] == "fp16" and summary["path"] == str(out)
    assert summary["min_cosine_fp16_vs_fp32"] >= FP16_PARITY_THRESHOLD and summary["size_ratio"] < 0.55
    assert read_onnx_metadata(out).precision == "fp16"
