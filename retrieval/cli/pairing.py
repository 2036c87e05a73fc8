"""One rule for the evaluate commands: which query encoder may search a gallery embedded by another.

Asymmetric evaluation (AML) embeds queries with a light student and the gallery with its teacher. The
pairing is meaningful only when the student was trained into the teacher's space: its ``teacher_id``
is the gallery encoder's id (or it is the gallery encoder itself). Any other pairing ranks vectors
of unrelated spaces and produces numbers that look like results but mean nothing, so the commands
refuse it, the way ``serving.engine.check_compatible`` refuses it for an index and
``indexing.calibrate_index`` for a calibration. This module holds the check for ``retrieval evaluate
recall|dyml|revisited --query-encoder`` so the three commands say the same thing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.errors import UserFacingError

if TYPE_CHECKING:
    from models.checkpoint import CheckpointInfo

__all__ = ["EncoderPairingError", "check_query_encoder_pairing"]


class EncoderPairingError(UserFacingError, ValueError):
    """A query encoder that does not embed into the gallery encoder's space."""


def check_query_encoder_pairing(query_info: CheckpointInfo, gallery_info: CheckpointInfo) -> None:
    """Refuse a query encoder that is neither the gallery encoder nor a student distilled against it.

    Args:
        query_info: the ``--query-encoder`` checkpoint (``models.read_checkpoint_info``).
        gallery_info: the ``--encoder`` checkpoint, which embeds the gallery.

    Raises:
        EncoderPairingError: the embedding sizes differ, or the query encoder's id and its ``teacher_id``
            both differ from the gallery encoder's id (the one-line message names the ids).
    """
    query_dim, gallery_dim = query_info.config.embedding_dim, gallery_info.config.embedding_dim
    if query_dim != gallery_dim:
        raise EncoderPairingError(
            f"--query-encoder {query_info.path} embeds into {query_dim} dimensions but --encoder "
            f"{gallery_info.path} into {gallery_dim}; asymmetric evaluation needs the same space"
        )
    teacher_id = query_info.config.teacher_id
    if gallery_info.encoder_id in (query_info.encoder_id, teacher_id):
        return
    teacher = f"teacher {teacher_id}" if teacher_id else "no teacher"
    raise EncoderPairingError(
        f"query encoder {query_info.encoder_id} ({teacher}) was not distilled against the gallery encoder "
        f"{gallery_info.encoder_id}: pass a student whose teacher_id is {gallery_info.encoder_id}, or that encoder"
    )
