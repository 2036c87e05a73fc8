"""Metric-learning losses, looked up by name through ``LOSSES`` / ``create_loss``.

A loss maps ``(embeddings (N, D), labels (N,) or (N, L))`` to a scalar and may own learnable
parameters (proxies), which the trainer optimises together with the encoder.
"""

from training.losses.registry import LOSSES, available_losses, create_loss, is_distillation_loss, needs_hierarchy

__all__ = ["LOSSES", "available_losses", "create_loss", "is_distillation_loss", "needs_hierarchy"]
