"""GeM, the encoder's output contract, and checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch

from models import CheckpointError, Encoder, load_encoder, read_checkpoint_info, save_encoder
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


def test_offline_pretrained_fails_with_weights_hint(monkeypatch):
    """With the hub unreachable, asking for pretrained weights must point at --weights PATH."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(BackboneError, match="--weights PATH"):
        create_backbone("resnet10t", pretrained=True)


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
