"""Backbone factory over timm: any timm model name that produces a (N, C, H, W) feature map.

Pretrained weights come from one of three places, tried in this order:

1. a local file (``weights=PATH``, ``retrieval train --weights``), the route on offline machines;
2. the local weight caches (the Hugging Face hub cache and torch's hub cache), read without touching the
   network, so weights downloaded once keep working offline;
3. the hub through timm (``pretrained=True``), after a short reachability probe: an offline machine fails in
   seconds with a message naming ``--weights`` instead of spending a minute in the hub client's retries.

Files are read without unpickling code: safetensors directly, ``.pth``/``.bin`` through
``torch.load(weights_only=True)``. An encoder checkpoint written by this engine is refused here (it holds the
pooling and head too, and is verified against its checksum elsewhere): ``--init-from`` starts from it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retrieval.errors import UserFacingError

__all__ = [
    "BackboneError",
    "cached_pretrained_file",
    "create_backbone",
    "hub_reachable",
    "is_engine_checkpoint",
    "load_backbone_weights",
]

logger = logging.getLogger(__name__)

#: Seconds the reachability probe waits for name resolution plus a TCP connection.
PROBE_TIMEOUT_S = 4.0
_OFFLINE_HINT = (
    "On a machine without network access, download the weights elsewhere and pass them with --weights PATH "
    "(a safetensors or .pth state dict), or train from scratch with --set model.pretrained=false."
)
# What an encoder checkpoint directory of this engine holds (models.checkpoint), and the key only its weights have.
_ENGINE_FILES = ("config.json", "model.safetensors")
_ENGINE_HEAD_KEYS = ("head.proj.weight",)


class BackboneError(UserFacingError, RuntimeError):
    """A backbone that cannot be built or whose weights cannot be loaded.

    Attributes:
        field: the ``EncoderConfig`` field at fault (``"backbone"``, ``"pretrained"``), or ``None`` for a
            problem with a local weights file; the encoder prefixes its message with the config key.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def create_backbone(name: str, pretrained: bool = False, weights: str | Path | None = None) -> nn.Module:
    """Build a timm model without classifier or global pooling, exposing ``forward_features``.

    Args:
        name: any timm model name (``timm.list_models()``), e.g. ``resnet101``, ``efficientnet_b3``.
        pretrained: load timm's pretrained weights: from the local caches when they hold them, else from the
            hub (network access needed; an unreachable hub fails within seconds).
        weights: a local weights file to load instead (safetensors, or a ``.pth``/``.bin`` state dict).

    Raises:
        BackboneError: unknown name, or pretrained weights that cannot be fetched or loaded.
    """
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BackboneError(f"unknown timm backbone {name!r}.{hint}", field="backbone")
    if weights is not None:
        _refuse_engine_checkpoint(Path(weights))
    if not pretrained or weights is not None:
        model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        if weights is not None:
            load_backbone_weights(model, weights)
        return model
    return _create_pretrained(name)


def _create_pretrained(name: str) -> nn.Module:
    """timm's pretrained model, from the local caches when possible, else from the hub after a quick probe."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise BackboneError(
            f"timm has no pretrained weights for {name!r}; train it with --set model.pretrained=false",
            field="pretrained",
        )
    cached = cached_pretrained_file(cfg.hf_hub_id, cfg.url, cfg.hf_hub_filename)
    if cached is not None:
        logger.info("pretrained weights for %s from the local cache: %s", name, cached)
        state = _read_state_dict(cached)
        overlay = {"state_dict": state, "source": ""}  # timm's own filters and classifier handling still apply
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, global_pool=""
            )
        except Exception as exc:  # a stale or foreign cache entry
            raise BackboneError(
                f"cached pretrained weights {cached} do not load into {name!r}: {exc}", field="pretrained"
            ) from exc
    where = cfg.hf_hub_id or cfg.url
    reason = _offline_reason(cfg.hf_hub_id, cfg.url)
    if reason is not None:
        raise BackboneError(
            f"pretrained weights for {name!r} ({where}) are not in the local cache and cannot be downloaded: "
            f"{reason}. {_OFFLINE_HINT}",
            field="pretrained",
        )
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, global_pool="")
    except Exception as exc:  # timm/hf-hub raise many network error types
        raise BackboneError(
            f"could not fetch pretrained weights for {name!r} through timm ({type(exc).__name__}: {exc}). "
            f"{_OFFLINE_HINT}",
            field="pretrained",
        ) from exc


def cached_pretrained_file(hf_hub_id: str | None, url: str | None, hf_filename: str | None = None) -> Path | None:
    """The local copy of a timm pretrained weights file, if the HF hub cache or torch's hub cache holds one.

    Looks only at the disk (never the network), in the caches timm itself downloads into: the Hugging Face
    cache (``HF_HUB_CACHE``) for ``hf_hub_id`` (``model.safetensors`` first, then ``pytorch_model.bin``, or
    the config's own file name), then ``<torch hub dir>/checkpoints/<file name of url>``.
    """
    if hf_hub_id:
        try:
            import huggingface_hub
            from huggingface_hub import constants
        except ImportError:  # timm works without the hub client; only the URL cache applies then
            huggingface_hub = None
        if huggingface_hub is not None:
            names = [hf_filename] if hf_filename else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = huggingface_hub.try_to_load_from_cache(hf_hub_id, filename, cache_dir=constants.HF_HUB_CACHE)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


def _offline_reason(hf_hub_id: str | None, url: str | None) -> str | None:
    """Why a download cannot work right now (offline mode, or the host does not answer), or ``None``."""
    target = url
    if hf_hub_id:
        try:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                return "HF_HUB_OFFLINE is set"
            target = constants.ENDPOINT
        except ImportError:
            pass
    if not target:
        return "no download location is known"
    ok, detail = hub_reachable(target)
    return None if ok else detail


def hub_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether a TCP connection to ``url``'s host (or the configured HTTPS proxy) opens within ``timeout`` s.

    The probe replaces the hub client's own failure path, which retries a failed request with back-off for
    about a minute per file. It runs in a daemon thread so a resolver that hangs cannot hold the caller.

    Returns:
        ``(reachable, detail)``: ``detail`` says what failed when not reachable.
    """
    proxy = urllib.request.getproxies().get("https")
    parsed = urllib.parse.urlparse(proxy if proxy else url)
    host = parsed.hostname
    if not host:
        return False, f"cannot parse a host from {url!r}"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout)
    if outcome.get("ok"):
        return True, ""
    via = " (the HTTPS proxy)" if proxy else ""
    error = outcome.get("error")
    detail = f"{type(error).__name__}: {error}" if error is not None else f"no answer within {timeout:.0f} s"
    return False, f"{host}:{port}{via} cannot be reached ({detail})"


def is_engine_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is an encoder checkpoint this engine wrote (its directory, or the weights file in it).

    Also recognises a bare safetensors file holding an engine encoder's state dict (``backbone.*`` plus the
    embedding head), which a backbone cannot load.
    """
    path = Path(path)
    if path.is_dir():
        return all((path / name).is_file() for name in _ENGINE_FILES)
    if path.name == _ENGINE_FILES[1] and (path.parent / _ENGINE_FILES[0]).is_file():
        return True
    if path.is_file() and path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
        except Exception:  # not readable as safetensors: load_backbone_weights reports it
            return False
        return any(k.startswith("backbone.") for k in keys) and any(k in keys for k in _ENGINE_HEAD_KEYS)
    return False


def _refuse_engine_checkpoint(path: Path) -> None:
    if is_engine_checkpoint(path):
        directory = path if path.is_dir() else path.parent
        raise BackboneError(
            f"{path} is an encoder checkpoint written by this engine (backbone, pooling and head), not backbone "
            f"weights; start from it with --init-from {directory}"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``, ignoring classifier weights the backbone no longer has.

    Raises:
        BackboneError: missing file, unreadable file, an engine encoder checkpoint (use ``--init-from``), or
            backbone parameters absent from the file.
    """
    path = Path(path)
    _refuse_engine_checkpoint(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    state: Any = _read_state_dict(path)
    for key in ("state_dict", "model"):  # common wrappers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:5])
        raise BackboneError(
            f"{path} does not match this backbone: {len(result.missing_keys)} parameters missing (e.g. {shown})"
        )
    if result.unexpected_keys:
        logger.info("ignored %d unexpected keys from %s (classifier head)", len(result.unexpected_keys), path)
