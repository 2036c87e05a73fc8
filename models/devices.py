"""Turning a device name from a recipe or the command line into a ``torch.device``."""

from __future__ import annotations

import torch

from retrieval.config import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a CUDA device on a machine without one is a clear error.

    Raises:
        ConfigError: an unknown device name, or CUDA requested where no CUDA device is visible.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was requested but no CUDA device is visible; use cpu or auto")
    return device
