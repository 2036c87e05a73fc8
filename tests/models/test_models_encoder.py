"""GeM, the encoder's output contract, and checkpoint round trips."""

from __future__ import annotations

import json
import time

import pytest
import torch

from models import CheckpointError, Encoder, EncoderConfig, load_encoder, read_checkpoint_info, save_encoder
from models.backbones import BackboneError, create_backbone
from models.pooling import GeM


def test_gem_matches_naive_formula():
    torch.manual_seed(0)
    x = torch.rand(2, 5, 3, 4)
    gem = GeM(p=3.0)
    expected = torch.stack(
        [torch.stack([(x[n, c].clamp(min=1e-6) ** 3).mean() ** (1 / 3) for c in range(5)]) for n in range(2)]
    )
    torch.testing.assert_close(gem(x), expected)


def test_gem_p_one_is_average_pooling_and_p_is_learnable():
    x = torch.rand(1, 4, 6, 6) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    gem = GeM(p=3.0)
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs().item() > 0


def test_gem_is_size_agnostic():
    """A spatial mean works at any map size; a pooling kernel taken from the export shape would not."""
    gem = GeM()
    for h, w in [(2, 2), (7, 5), (13, 17)]:
        assert gem(torch.rand(3, 8, h, w)).shape == (3, 8)


def test_encoder_outputs_unit_float32_embeddings(tiny_encoder_config):
    torch.manual_seed(0)
    encoder = Encoder(tiny_encoder_config).eval()
    with torch.no_grad():
        out = encoder(torch.randn(3, 3, 32, 32))
        out_other_size = encoder(torch.randn(2, 3, 48, 40))
    assert out.shape == (3, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert out_other_size.shape == (2, 32)


def test_checkpoint_round_trip_needs_nothing_but_the_directory(tiny_encoder_config, tmp_path):
    torch.manual_seed(1)
    encoder = Encoder(tiny_encoder_config).eval()
    encoder_id = save_encoder(encoder, tmp_path / "ckpt")
    loaded = load_encoder(tmp_path / "ckpt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))
    assert loaded.encoder_id == encoder_id and len(encoder_id) == 16
    info = read_checkpoint_info(tmp_path / "ckpt")
    assert info.config == tiny_encoder_config
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_encoder_id_changes_with_weights(tiny_encoder_config, tmp_path):
    torch.manual_seed(2)
    first = save_encoder(Encoder(tiny_encoder_config), tmp_path / "a")
    torch.manual_seed(3)
    second = save_encoder(Encoder(tiny_encoder_config), tmp_path / "b")
    assert first != second


def test_resaving_replaces_checkpoint_atomically(tiny_encoder_config, tmp_path):
    torch.manual_seed(4)
    save_encoder(Encoder(tiny_encoder_config), tmp_path / "ckpt")
    torch.manual_seed(5)
    new_id = save_encoder(Encoder(tiny_encoder_config), tmp_path / "ckpt")
    assert read_checkpoint_info(tmp_path / "ckpt").encoder_id == new_id
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old directories left behind


def test_checkpoint_errors_are_clear(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not an encoder checkpoint"):
        load_encoder(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"garbage")
    payload = json.loads((tiny_checkpoint / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the checksum recorded"):
        load_encoder(broken)
    payload["format_version"] = 99
    (broken / "config.json").write_text(json.dumps(payload))
    with pytest.raises(CheckpointError, match="format version 99"):
        read_checkpoint_info(broken)


def test_backbone_errors_name_the_fix(tmp_path):
    with pytest.raises(BackboneError, match="unknown timm backbone"):
        create_backbone("not_a_real_net")
    with pytest.raises(BackboneError, match="weights file not found"):
        create_backbone("resnet10t", weights=tmp_path / "missing.safetensors")


@pytest.fixture()
def empty_weight_caches(tmp_path, monkeypatch):
    """Point the HF hub cache and torch's hub cache at empty folders (this machine's caches stay untouched)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    return tmp_path / "hf-cache"


def test_offline_pretrained_fails_with_weights_hint(monkeypatch, empty_weight_caches):
    """With the hub unreachable, asking for pretrained weights must point at --weights PATH."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(BackboneError, match="--weights PATH") as raised:
        create_backbone("resnet10t", pretrained=True)
    assert raised.value.field == "pretrained" and "HF_HUB_OFFLINE is set" in str(raised.value)


def test_an_unreachable_hub_fails_in_seconds_not_a_minute_of_retries(monkeypatch, empty_weight_caches):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(BackboneError, match=r"127\.0\.0\.1:9 cannot be reached .*--weights PATH"):
        create_backbone("resnet10t", pretrained=True)
    assert time.perf_counter() - start < 20


def test_this_machine_offline_fails_fast_naming_weights(empty_weight_caches):
    """The real hub address, where it cannot be reached (the development machine has no internet)."""
    from huggingface_hub import constants

    from models.backbones import hub_reachable

    if hub_reachable(constants.ENDPOINT)[0]:
        pytest.skip(f"{constants.ENDPOINT} is reachable from here")
    start = time.perf_counter()
    with pytest.raises(BackboneError, match=r"not in the local cache and cannot be downloaded.*--weights PATH"):
        create_backbone("resnet10t", pretrained=True)
    assert time.perf_counter() - start < 20


def test_weights_in_the_local_hub_cache_load_offline(monkeypatch, empty_weight_caches):
    """A file timm downloaded earlier (HF cache layout) is used without any network access."""
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    repo = empty_weight_caches / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(11)
    source = timm.create_model("resnet10t", pretrained=False)  # with its classifier, as published
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = create_backbone("resnet10t", pretrained=True).state_dict()
    assert "fc.weight" not in loaded
    for key, value in loaded.items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_encoder_build_errors_name_the_config_key():
    from retrieval.config import ConfigError
    from retrieval.registry import UnknownNameError

    with pytest.raises(BackboneError, match=r"^model\.backbone: unknown timm backbone 'resnet_nope'"):
        Encoder(EncoderConfig(backbone="resnet_nope"))
    with pytest.raises(UnknownNameError, match=r"^model\.pooling: unknown pooling 'maxx'; valid names: avg, gem, max"):
        Encoder(EncoderConfig(backbone="resnet10t", pooling="maxx"))
    with pytest.raises(ConfigError, match=r"^model\.pooling_params: .*unexpected keyword argument 'q'"):
        Encoder(EncoderConfig(backbone="resnet10t", pooling_params={"q": 2.0}))
    with pytest.raises(ConfigError, match=r"^model\.attention_params: "):
        Encoder(EncoderConfig(backbone="resnet10t", attention="glam", attention_params={"reduction": "x"}))


def test_backbone_weights_refuse_an_engine_checkpoint(tiny_checkpoint):
    from models.backbones import is_engine_checkpoint

    assert is_engine_checkpoint(tiny_checkpoint) and is_engine_checkpoint(tiny_checkpoint / "model.safetensors")
    with pytest.raises(BackboneError, match=rf"start from it with --init-from {tiny_checkpoint}$"):
        create_backbone("resnet10t", weights=tiny_checkpoint)


def test_load_weights_into_copies_every_layer_after_checking_the_checksum(tiny_checkpoint, tmp_path):
    import shutil

    from file_damage import flip_bytes

    from models.checkpoint import load_weights_into

    info = read_checkpoint_info(tiny_checkpoint)
    torch.manual_seed(99)
    fresh = Encoder(info.config)
    assert load_weights_into(fresh, tiny_checkpoint).encoder_id == info.encoder_id
    expected = load_encoder(tiny_checkpoint).state_dict()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, damaged)
    flip_bytes(damaged / "model.safetensors", count=4, seed=1)
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_weights_into(Encoder(info.config), damaged)
    other = Encoder(info.config.model_copy(update={"embedding_dim": 8}))
    with pytest.raises(CheckpointError, match="do not fit the encoder being trained"):
        load_weights_into(other, tiny_checkpoint)


def test_local_backbone_weights_are_loaded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(6)
    source = create_backbone("resnet10t")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_backbone("resnet10t", weights=tmp_path / name)
        for key, value in source.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value)


def test_device_names_resolve_or_fail_clearly():
    from models.devices import resolve_device
    from retrieval.config import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible"):
            resolve_device("cuda:1")
