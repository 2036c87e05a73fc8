"""The mobile export: uint8 input, int8 QDQ weights, an ORT copy, and agreement with float32 enforced."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from PIL import Image
from typer.testing import CliRunner

from models import load_encoder
from retrieval.cli.main import app as cli
from retrieval.data.preprocess import normalise_array, to_uint8_chw
from serving.calibration_images import CalibrationError, load_calibration_split
from serving.export import ExportError
from serving.export_mobile import export_onnx_mobile
from serving.mobile_agreement import measure_agreement, row_cosines, top_k_overlap
from serving.mobile_graph import uint8_input_model
from serving.onnx_metadata import read_onnx_metadata

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_IMAGES = 40


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """40 seeded PNGs of varied sizes (a coloured background, a rectangle, noise) and one corrupt file."""
    root = tmp_path_factory.mktemp("mobile_photos")
    rng = np.random.default_rng(11)
    for i in range(N_IMAGES):
        height, width = rng.integers(36, 72, 2)
        pixels = np.empty((height, width, 3))
        pixels[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[y : y + height // 2, x : x + width // 2] = rng.integers(0, 256, 3)
        pixels += rng.normal(0, 20, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"photo_{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def mobile(tiny_checkpoint, photo_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile") / "query.onnx"
    return export_onnx_mobile(
        tiny_checkpoint, out, photo_folder, calibration_count=20, agreement_count=20, latency_repeats=5
    )


def test_agreement_numbers_are_reported_and_meet_the_defaults(mobile):
    assert (mobile.calibration_images, mobile.agreement_images, mobile.k) == (20, 20, 10)
    assert mobile.mean_cosine >= 0.98 and mobile.top_k_overlap >= 0.8
    assert -1.0 <= mobile.min_cosine <= mobile.mean_cosine <= 1.0
    assert mobile.front_parity >= 0.9999 and mobile.ort_parity >= 0.999 and mobile.fp32_parity >= 0.9999
    assert mobile.size_ratio < 0.3  # int8 weights: about a quarter of float32
    assert mobile.fp32_ms > 0 and mobile.int8_ms > 0
    assert mobile.skipped == [(str(mobile_path := Path(mobile.skipped[0][0])), mobile.skipped[0][1])]
    assert mobile_path.name == "broken.png"
    summary = mobile.as_dict()
    assert json.loads(json.dumps(summary))["latency_ratio"] == pytest.approx(mobile.int8_ms / mobile.fp32_ms)


def test_graph_takes_one_uint8_image_and_is_int8_qdq(mobile, tiny_encoder_config):
    model = onnx.load(str(mobile.path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 3, 32, 32]
    assert out.name == "embeddings" and [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 32]
    ops = [node.op_type for node in model.graph.node]
    assert _chain_from_input(model.graph, "image", 5) == ["Cast", "Div", "Sub", "Div", "QuantizeLinear"]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    int8_weights = [init for init in model.graph.initializer if init.data_type == TensorProto.INT8]
    assert sum(int(np.prod(init.dims)) for init in int8_weights) > 0.9 * 4.9e6  # resnet10t's conv weights
    info = read_onnx_metadata(mobile.path)
    assert (info.input_format, info.precision, info.embedding_dim) == ("uint8_rgb", "int8", 32)
    assert info.preprocess == tiny_encoder_config.preprocess


def _chain_from_input(graph, name: str, steps: int) -> list[str]:
    """Op types met following the (single) consumer of ``name`` for ``steps`` nodes."""
    chain = []
    for _ in range(steps):
        (node,) = [node for node in graph.node if name in node.input]
        chain.append(node.op_type)
        name = node.output[0]
    return chain


def test_ort_copy_loads_and_embeds_like_the_onnx_file(mobile, photo_folder, tiny_encoder_config):
    assert mobile.ort_path == mobile.path.with_suffix(".ort") and mobile.ort_path.read_bytes()[4:8] == b"ORTM"
    assert sorted(p.name for p in mobile.path.parent.iterdir()) == ["query.onnx", "query.ort", "query.ort.sha256"]
    pixels = to_uint8_chw(Image.open(photo_folder / "photo_03.png"), tiny_encoder_config.preprocess)[None]
    outputs = []
    for path in (mobile.path, mobile.ort_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"image": pixels})[0])
    assert row_cosines(*outputs)[0] >= 0.999
    meta = ort.InferenceSession(str(mobile.ort_path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["input_format"] == "uint8_rgb"


def test_int8_model_on_pixels_follows_pytorch_on_normalised_images(mobile, tiny_checkpoint, photo_folder):
    import torch

    encoder = load_encoder(tiny_checkpoint)
    pre = encoder.config.preprocess
    pixels = np.stack([to_uint8_chw(Image.open(photo_folder / f"photo_{i:02d}.png"), pre) for i in range(5)])
    with torch.no_grad():
        reference = encoder(torch.from_numpy(normalise_array(pixels, pre))).numpy()
    session = ort.InferenceSession(str(mobile.path), providers=["CPUExecutionProvider"])
    quantised = np.concatenate([session.run(None, {"image": p[None]})[0] for p in pixels])
    assert row_cosines(reference, quantised).mean() >= 0.98


def test_uint8_front_reproduces_the_float_graph(serving_onnx, photo_folder, tiny_encoder_config):
    pre = tiny_encoder_config.preprocess
    front = uint8_input_model(onnx.load(str(serving_onnx)), pre)
    pixels = np.stack([to_uint8_chw(Image.open(photo_folder / f"photo_{i:02d}.png"), pre) for i in range(4)])
    float_session = ort.InferenceSession(str(serving_onnx), providers=["CPUExecutionProvider"])
    front_session = ort.InferenceSession(front.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = float_session.run(None, {"images": normalise_array(pixels, pre)})[0]
    got = np.concatenate([front_session.run(None, {"image": p[None]})[0] for p in pixels])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_too_strict_a_threshold_fails_with_the_numbers_and_writes_nothing(tiny_checkpoint, photo_folder, tmp_path):
    out = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match=r"mean cosine 0\.\d+ < --min-cosine 0\.99999999.*nothing was written"):
        export_onnx_mobile(
            tiny_checkpoint, out, photo_folder, calibration_count=12, agreement_count=12, min_cosine=0.99999999
        )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match=r"--min-cosine must be a cosine in \[-1, 1\], got 1.0000001"):
        export_onnx_mobile(tiny_checkpoint, out, photo_folder, min_cosine=1.0000001)
    with pytest.raises(ExportError, match="--min-overlap"):
        export_onnx_mobile(tiny_checkpoint, out, photo_folder, min_overlap=1.5)
    assert list(tmp_path.iterdir()) == []


def test_calibration_split_is_disjoint_and_shrinks_calibration_when_images_run_short(photo_folder, tiny_encoder_config):
    pre = tiny_encoder_config.preprocess
    split = load_calibration_split(photo_folder, pre, calibration_count=100, held_out_count=100)
    assert len(split.calibration) + len(split.held_out) == N_IMAGES
    assert (len(split.calibration), len(split.held_out)) == (20, 20)
    assert split.calibration[0].shape == (3, 32, 32) and split.calibration[0].dtype == np.uint8
    held = {a.tobytes() for a in split.held_out}
    assert not any(a.tobytes() in held for a in split.calibration)
    few = photo_folder.parent / "few_photos"
    few.mkdir(exist_ok=True)
    for i in range(5):
        (few / f"p{i}.png").write_bytes((photo_folder / f"photo_{i:02d}.png").read_bytes())
    with pytest.raises(CalibrationError, match="5 readable image"):
        load_calibration_split(few, pre)


def _naive_top(query, gallery, skip, k):
    scored = [(-float(query @ gallery[j]), j) for j in range(len(gallery)) if j != skip]
    return {j for _, j in sorted(scored)[:k]}


def _naive_overlap(gallery, reference, candidate, k):
    fractions = []
    for i in range(len(gallery)):
        shared = _naive_top(reference[i], gallery, i, k) & _naive_top(candidate[i], gallery, i, k)
        fractions.append(len(shared) / k)
    return sum(fractions) / len(fractions)


def test_top_k_overlap_matches_a_naive_loop():
    rng = np.random.default_rng(3)
    gallery = rng.standard_normal((25, 8))
    candidate = gallery + rng.normal(0, 0.3, gallery.shape)
    for k in (1, 5, 10, 24):
        assert top_k_overlap(gallery, gallery, candidate, k) == pytest.approx(
            _naive_overlap(gallery, gallery, candidate, k)
        )
    assert top_k_overlap(gallery, gallery, gallery, 10) == 1.0
    agreement = measure_agreement(gallery, candidate)
    assert agreement.k == 10 and agreement.images == 25
    with pytest.raises(ValueError, match="k must be"):
        top_k_overlap(gallery, gallery, candidate, 25)


def test_cli_mobile_end_to_end_with_json(tiny_checkpoint, photo_folder, tmp_path):
    out = tmp_path / "phone.onnx"
    args = ["export", "--encoder", str(tiny_checkpoint), "--out", str(out), "--format", "onnx-mobile"]
    calibration = ["--calibration-images", str(photo_folder), "--calibration-count", "16", "--agreement-count", "16"]
    runner = CliRunner()
    result = runner.invoke(cli, [*args, *calibration, "--latency-repeats", "3", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["format"] == "onnx-mobile" and summary["path"] == str(out)
    assert summary["ort_path"] == str(out.with_suffix(".ort")) and out.with_suffix(".ort").is_file()
    for key in ("size_ratio", "latency_ratio", "mean_cosine", "min_cosine", "top_k_overlap", "int8_ms", "fp32_ms"):
        assert isinstance(summary[key], float)
    text = runner.invoke(cli, [*args, *calibration, "--latency-repeats", "3"])
    assert text.exit_code == 0 and "top-10 overlap" in text.output and "held-out" in text.output
    missing = runner.invoke(cli, args)
    assert missing.exit_code == 2 and "--calibration-images" in missing.output
    invalid = runner.invoke(cli, [*args, *calibration, "--min-cosine", "1.0000001"])
    assert invalid.exit_code == 2 and "--min-cosine" in invalid.output
