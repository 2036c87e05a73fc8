"""The ensemble encoder (a DM² cohort as one encoder), its config checks, and ``Encoder.embed_feature_map``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from models import (
    Encoder,
    EncoderConfig,
    EnsembleEncoder,
    NoFeatureMapError,
    create_encoder,
    ensemble_config,
    load_encoder,
    read_checkpoint_info,
    save_encoder,
)
from models.encoder import eval_mode
from models.ensemble import join_embeddings
from retrieval.config import ConfigError
from retrieval.data.transforms import PreprocessConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRE = PreprocessConfig(input_size=32)


def _member(backbone: str = "resnet10t", dim: int = 16, **update) -> EncoderConfig:
    return EncoderConfig(**{"backbone": backbone, "embedding_dim": dim, "preprocess": PRE, **update})


def _cohort(seed: int = 0) -> list[Encoder]:
    """Three members of different backbones, dimensions and projection layouts, seeded random weights."""
    torch.manual_seed(seed)
    return [
        Encoder(_member("resnet10t", 16)).eval(),
        Encoder(_member("resnet18", 8)).eval(),
        Encoder(_member("resnet10t", 12, projection="before_pooling", pooling_params={"p": 2.0})).eval(),
    ]


def _images(batch: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _manual(members: list[Encoder], images: torch.Tensor) -> torch.Tensor:
    """Reference: each member's unit embedding, concatenated, divided by its norm (written out, not F.normalize)."""
    joined = torch.cat([member(images) for member in members], dim=1)
    return joined / joined.pow(2).sum(dim=1, keepdim=True).sqrt()


def test_ensemble_is_the_renormalised_concatenation_of_its_members():
    members = _cohort()
    ensemble = EnsembleEncoder.from_members(members).eval()
    images = _images(batch=3, size=40)
    with torch.no_grad():
        out = ensemble(images)
        expected = _manual(members, images)
    assert out.shape == (3, 16 + 8 + 12) and out.dtype == torch.float32
    assert ensemble.embedding_dim == ensemble.config.embedding_dim == 36
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # Every member counts equally: the ensemble's inner product is the mean of the members' cosines.
    other = _images(batch=3, size=40, seed=2)
    with torch.no_grad():
        member_cosines = torch.stack([(m(images) * m(other)).sum(1) for m in members]).mean(0)
        torch.testing.assert_close((out * ensemble(other)).sum(1), member_cosines)


def test_join_embeddings_computes_the_ensemble_from_the_members_vectors():
    members = _cohort()
    ensemble = EnsembleEncoder.from_members(members).eval()
    images = _images(batch=4)
    with torch.no_grad():
        joined = join_embeddings([member(images).numpy() for member in members])
        expected = ensemble(images).numpy()
    assert joined.dtype == np.float32 and joined.shape == expected.shape
    np.testing.assert_allclose(joined, expected, atol=1e-6)


def test_ensemble_config_follows_its_members():
    members = _cohort()
    config = EnsembleEncoder.from_members(members, provenance={"method": "dm2"}).config
    assert config.backbone == "ensemble"
    assert config.embedding_dim == 36
    assert config.preprocess == PRE and config.levels == members[0].config.levels
    assert config.members == [member.config for member in members]
    assert config.provenance == {"method": "dm2"}
    assert EncoderConfig.model_validate_json(config.model_dump_json()) == config


def test_save_load_round_trip_gives_the_same_outputs_and_id(tmp_path):
    ensemble = EnsembleEncoder.from_members(_cohort(seed=3)).eval()
    encoder_id = save_encoder(ensemble, tmp_path / "ens")
    loaded = load_encoder(tmp_path / "ens")
    assert isinstance(loaded, EnsembleEncoder) and not loaded.training
    assert loaded.encoder_id == encoder_id == ensemble.encoder_id
    assert loaded.config == ensemble.config
    assert [m.config for m in loaded.members] == ensemble.config.members
    images = _images(batch=2, size=48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), ensemble(images), rtol=0, atol=0)
    keys = list(loaded.state_dict())
    assert keys and all(key.startswith(("members.0.", "members.1.", "members.2.")) for key in keys)
    assert any(key.startswith("members.2.head.proj") for key in keys)
    assert read_checkpoint_info(tmp_path / "ens").config.members[1].backbone == "resnet18"
    assert save_encoder(loaded, tmp_path / "again") == encoder_id  # same weights, same bytes, same id


def test_loading_builds_members_without_pretrained_but_keeps_the_recorded_flag(tmp_path):
    members = _cohort(seed=4)[:2]
    members[0].config = members[0].config.model_copy(update={"pretrained": True})  # "started from ImageNet"
    save_encoder(EnsembleEncoder.from_members(members).eval(), tmp_path / "ens")
    loaded = load_encoder(tmp_path / "ens")  # must not fetch ImageNet weights: the checkpoint holds them all
    assert loaded.members[0].config.pretrained is True and loaded.config.members[0].pretrained is True
    images = _images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), _manual(members, images))


def test_from_members_shares_the_live_modules():
    members = _cohort(seed=5)
    ensemble = EnsembleEncoder.from_members(members).eval()
    assert all(held is given for held, given in zip(ensemble.members, members, strict=True))
    images = _images(batch=2)
    with torch.no_grad():
        before = ensemble(images)
        members[1].head.proj.weight.mul_(-1.0).add_(0.05)  # a "training step" on member 1 only
        after = ensemble(images)
    assert not torch.allclose(before[:, 16:24], after[:, 16:24], atol=1e-3)
    torch.testing.assert_close(after[:, :16], before[:, :16])  # the other members' blocks are untouched
    with torch.no_grad():
        torch.testing.assert_close(after, _manual(members, images))
    assert ensemble.state_dict()["members.1.head.proj.weight"].data_ptr() == members[1].head.proj.weight.data_ptr()


def test_refresh_config_takes_the_members_current_configs():
    members = _cohort(seed=5)[:2]
    ensemble = EnsembleEncoder.from_members(members, provenance={"method": "dm2"})
    members[1].config = members[1].config.model_copy(update={"provenance": {"steps": 100}})
    assert ensemble.config.members[1].provenance == {}  # a snapshot taken at wrap time
    refreshed = ensemble.refresh_config()
    assert refreshed is ensemble.config and refreshed.members[1].provenance == {"steps": 100}
    assert refreshed.provenance == {"method": "dm2"}


def test_gradients_reach_every_member():
    members = [Encoder(_member(dim=8)) for _ in range(2)]
    EnsembleEncoder.from_members(members)(_images(batch=2)).sum().backward()
    for member in members:
        assert member.head.proj.weight.grad is not None and member.head.proj.weight.grad.abs().sum() > 0


def test_create_encoder_builds_the_kind_the_config_describes():
    torch.manual_seed(6)
    config = ensemble_config([_member(dim=8), _member("resnet18", 4)])
    ensemble = create_encoder(config)
    assert isinstance(ensemble, EnsembleEncoder) and len(ensemble.members) == 2
    assert [m.config.backbone for m in ensemble.members] == ["resnet10t", "resnet18"]
    with torch.no_grad():
        assert ensemble.eval()(_images(batch=1)).shape == (1, 12)
    single = create_encoder(_member(dim=8))
    assert type(single) is Encoder
    with pytest.raises(ConfigError, match="create_encoder"):
        Encoder(config)


def test_backbone_weights_are_refused_for_members_of_different_backbones(tmp_path):
    config = ensemble_config([_member(), _member("resnet18", 8)])
    with pytest.raises(ConfigError, match="resnet10t, resnet18"):
        EnsembleEncoder(config, backbone_weights=tmp_path / "weights.safetensors")


def test_mismatched_preprocessing_is_an_error_naming_the_member():
    other = _member(dim=8).model_copy(update={"preprocess": PreprocessConfig(input_size=64)})
    with pytest.raises(ConfigError, match=r"members\[1\] \(resnet10t\).*input_size=64.*same input"):
        ensemble_config([_member(), other])
    cropped = _member(dim=8, preprocess=PreprocessConfig(input_size=32, resize="center_crop"))
    with pytest.raises(ValidationError, match=r"members\[2\]"):
        EncoderConfig(backbone="ensemble", embedding_dim=40, preprocess=PRE, members=[_member(), _member(), cropped])


def test_nested_ensembles_and_bad_shapes_are_refused():
    inner = ensemble_config([_member(), _member()])
    with pytest.raises(ConfigError, match=r"members\[1\] \(ensemble\) is itself an ensemble"):
        ensemble_config([_member(), inner])
    with pytest.raises(ValidationError, match=r"embedding_dim 30 .* sum of its members' dims \(16 \+ 8 = 24\)"):
        EncoderConfig(backbone="ensemble", embedding_dim=30, preprocess=PRE, members=[_member(), _member(dim=8)])
    with pytest.raises(ValidationError, match="backbone must be 'ensemble'"):
        EncoderConfig(backbone="resnet10t", embedding_dim=16, preprocess=PRE, members=[_member()])
    with pytest.raises(ValidationError, match="needs members"):
        EncoderConfig(backbone="ensemble")
    with pytest.raises(ValidationError, match=r"members\[0\] .* has levels"):
        EncoderConfig(backbone="ensemble", embedding_dim=16, preprocess=PRE, members=[_member(levels=["fine"])])
    with pytest.raises(ConfigError, match="at least one member"):
        ensemble_config([])


def test_from_members_refuses_ensembles_duplicates_and_non_encoders():
    a, b = _cohort(seed=7)[:2]
    with pytest.raises(ConfigError, match="members 0 and 1 are the same encoder"):
        EnsembleEncoder.from_members([a, a])
    with pytest.raises(ConfigError, match="member 1 is itself an ensemble"):
        EnsembleEncoder.from_members([a, EnsembleEncoder.from_members([b])])
    with pytest.raises(TypeError, match="member 0 is a Linear"):
        EnsembleEncoder.from_members([torch.nn.Linear(2, 2)])  # type: ignore[list-item]


def test_an_ensemble_has_no_single_feature_map():
    ensemble = EnsembleEncoder.from_members(_cohort()[:2])
    with pytest.raises(NoFeatureMapError, match=r"members\[i\]"):
        ensemble.feature_map(_images(batch=1))
    with pytest.raises(NoFeatureMapError, match="embed_feature_map"):
        ensemble.embed_feature_map(torch.rand(1, 512, 1, 1))


def test_eval_mode_gives_live_members_back_their_own_mode():
    members = _cohort(seed=8)[:2]
    ensemble = EnsembleEncoder.from_members(members).eval()  # last set to eval by an evaluation pass...
    for member in members:
        member.train()  # ...while the cohort trains on
    with eval_mode(ensemble):
        assert not any(module.training for module in ensemble.modules())
    assert all(module.training for member in members for module in member.modules())
    assert not ensemble.training


def test_checkpoint_without_members_key_loads_unchanged(tiny_encoder_config, tmp_path):
    """Checkpoints written before ``members`` existed: same config, same id, same weights."""
    torch.manual_seed(9)
    encoder = Encoder(tiny_encoder_config).eval()
    encoder_id = save_encoder(encoder, tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    payload = json.loads(config_file.read_text())
    assert payload["config"].pop("members") == []
    config_file.write_text(json.dumps(payload, indent=2) + "\n")
    loaded = load_encoder(tmp_path / "old")
    assert type(loaded) is Encoder and loaded.encoder_id == encoder_id
    assert loaded.config == tiny_encoder_config and loaded.config.members == []
    images = _images(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images))


@pytest.mark.parametrize("projection", ["after_pooling", "before_pooling"])
def test_forward_is_embed_feature_map_of_feature_map(projection):
    torch.manual_seed(10)
    encoder = Encoder(_member(dim=24, projection=projection)).eval()
    images = _images(batch=3, size=48)
    with torch.no_grad():
        features = encoder.feature_map(images)
        out = encoder.embed_feature_map(features)
        torch.testing.assert_close(out, encoder(images), rtol=0, atol=0)
        # and it is a real second half: mixing two maps gives a unit vector that neither image's embedding is
        mixed = encoder.embed_feature_map(0.5 * features[:1] + 0.5 * features[1:2])
    assert out.shape == (3, 24)
    torch.testing.assert_close(mixed.norm(dim=1), torch.ones(1))
    assert F.cosine_similarity(mixed, out[:1]).item() < 0.99999
