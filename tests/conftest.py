"""Shared test fixtures: tiny encoders and seeded images, CPU only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep the suite from oversubscribing small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")

CLOTHING_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "clothing-small"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures(...)``).

    Tiny models gain nothing from a second thread, and on a busy 2-core machine two spinning OpenMP
    threads run 5-10x slower than one.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_encoder_config():
    """A small, fast encoder architecture for tests (random weights, 32 px inputs)."""
    from models.encoder import EncoderConfig
    from retrieval.data.transforms import PreprocessConfig

    return EncoderConfig(
        backbone="resnet10t",
        embedding_dim=32,
        preprocess=PreprocessConfig(input_size=32),
        provenance={"purpose": "tests"},
    )


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tiny_encoder_config):
    """Factory: save a tiny encoder with weights drawn from ``seed``; different seeds give different encoder ids."""
    import torch

    from models import Encoder, save_encoder

    def make(seed: int) -> Path:
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"ckpt{seed}") / "encoder"
        save_encoder(Encoder(tiny_encoder_config).eval(), path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """A saved checkpoint of a seeded random tiny encoder."""
    return make_checkpoint(0)


@pytest.fixture(scope="session")
def clothing_small() -> Path:
    """The real-photo dataset beside dev/CI checkouts; tests using it skip where it is absent."""
    if not (CLOTHING_SMALL / "labels.csv").is_file():
        pytest.skip("../shared/data/clothing-small is not present on this machine")
    return CLOTHING_SMALL


@pytest.fixture(scope="session")
def make_student(tmp_path_factory, tiny_encoder_config):
    """Factory: save a tiny "student" whose config names ``teacher_id`` (AML pairing), weights drawn from ``seed``.

    Pairing checks read only ``teacher_id`` and the embedding size, so a random encoder stands in for a
    distilled one. ``teacher_id`` may be a checkpoint path (its encoder id is used) or an id string.
    """
    import torch

    from models import Encoder, read_checkpoint_info, save_encoder

    def make(teacher: Path | str | None, seed: int = 3, embedding_dim: int | None = None) -> Path:
        teacher_id = read_checkpoint_info(teacher).encoder_id if isinstance(teacher, Path) else teacher
        update: dict = {"teacher_id": teacher_id}
        if embedding_dim is not None:
            update["embedding_dim"] = embedding_dim
        torch.manual_seed(seed)
        path = tmp_path_factory.mktemp(f"student{seed}") / "encoder"
        save_encoder(Encoder(tiny_encoder_config.model_copy(update=update)).eval(), path)
        return path

    return make
