"""Starting a run from an engine checkpoint (--init-from), and --weights refusing one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from file_damage import flip_bytes

from models.backbones import BackboneError
from models.checkpoint import CheckpointError, load_encoder, read_checkpoint_info
from retrieval.config import ConfigError, load_config
from retrieval.data.synthetic import SyntheticConfig, generate_split
from training.config import TrainConfig
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = SyntheticConfig(seed=4, image_size=32, num_colours=2, num_textures=2, train_per_class=3, val_per_class=1)


@pytest.fixture(scope="module")
def tiny_train():
    return generate_split(TINY, "train")


def _config(tmp_path, **top) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "name": "init-test",
            # a recipe model unlike the checkpoint's (resnet10t, 32-d, 32 px): the checkpoint's architecture wins
            "model": {"backbone": "resnet18", "embedding_dim": 64, "preprocess": {"input_size": 48}},
            "sampler": {"classes_per_batch": 4, "images_per_class": 2},
            "schedule": {"max_steps": 2, "warmup_steps": 1},
            "checkpoint_every": 0,
            "device": "cpu",
            "out_dir": str(tmp_path / "run"),
            **top,
        }
    )


def test_init_from_takes_every_layer_and_the_architecture_and_records_it(tiny_checkpoint, tiny_train, tmp_path, caplog):
    source = load_encoder(tiny_checkpoint)
    with caplog.at_level("WARNING", logger="training.starting_weights"):
        trainer = Trainer(_config(tmp_path, init_from=str(tiny_checkpoint)), tiny_train, None, progress=False)
    assert "model.backbone resnet18 -> resnet10t" in caplog.text and "model.embedding_dim 64 -> 32" in caplog.text
    model = trainer.config.model
    assert (model.backbone, model.embedding_dim, model.preprocess.input_size) == ("resnet10t", 32, 32)
    assert model.levels == ["fine", "middle", "coarse"] and model.pretrained is False
    start = trainer.encoder.state_dict()
    for key, value in source.state_dict().items():  # backbone, pooling and head alike
        assert torch.equal(start[key], value), key

    result = trainer.fit()
    trained = load_encoder(result.encoder_path)
    provenance = trained.config.provenance
    assert provenance["init_from"]["encoder_id"] == source.encoder_id
    assert provenance["init_from"]["path"] == str(tiny_checkpoint) and provenance["recipe"] == "init-test"
    assert provenance["steps"] == 2 and "purpose" not in provenance  # the source's provenance is not inherited
    assert trained.encoder_id != source.encoder_id


def test_init_from_verifies_the_weights_checksum(tiny_checkpoint, tiny_train, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint, damaged)
    flip_bytes(damaged / "model.safetensors", count=8, seed=0)
    with pytest.raises(CheckpointError, match=r"does not match the checksum recorded"):
        Trainer(_config(tmp_path, init_from=str(damaged)), tiny_train, None, progress=False)
    with pytest.raises(CheckpointError, match="is not an encoder checkpoint"):
        Trainer(_config(tmp_path, init_from=str(tmp_path)), tiny_train, None, progress=False)


def test_weights_refuses_an_engine_checkpoint_and_names_init_from(tiny_checkpoint, tiny_train, tmp_path):
    for given in (tiny_checkpoint, tiny_checkpoint / "model.safetensors"):
        config = _config(tmp_path, model={"backbone": "resnet10t"}, backbone_weights=str(given))
        with pytest.raises(BackboneError, match=rf"encoder checkpoint .*--init-from {tiny_checkpoint}$"):
            Trainer(config, tiny_train, None, progress=False)
    loose = tmp_path / "loose.safetensors"  # the engine's weights copied out of their directory
    shutil.copy(tiny_checkpoint / "model.safetensors", loose)
    with pytest.raises(BackboneError, match="--init-from"):
        Trainer(_config(tmp_path, model={"backbone": "resnet10t"}, backbone_weights=str(loose)), tiny_train, None)
    both = [f"init_from={tiny_checkpoint}", f"backbone_weights={loose}"]
    with pytest.raises(ConfigError, match=r"^invalid config: init_from .* and backbone_weights .* pass one$"):
        load_config(TrainConfig, None, both)


def test_a_student_checkpoint_fine_tuned_with_a_metric_loss_drops_its_teacher(make_student, tiny_train, tmp_path):
    student = make_student("0123456789abcdef", seed=5)
    assert read_checkpoint_info(student).config.teacher_id == "0123456789abcdef"
    trainer = Trainer(_config(tmp_path, init_from=str(student)), tiny_train, None, progress=False)
    assert trainer.config.model.teacher_id is None  # a metric loss does not keep it in the teacher's space
    assert json.loads(trainer.config.model_dump_json())["init_from"] == str(student)
