"""Typed configs merged as defaults < YAML recipe < ``--set key=value`` overrides.

Configs are pydantic models so that a typo in a recipe or an override is an error
naming the bad key, not a silently ignored value. Overrides use dotted paths
(``optim.lr=1e-3``) and YAML syntax for values (``loss.margins=[0.1,0.2]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from retrieval.errors import UserFacingError

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "format_validation_error",
    "load_config",
    "parse_override",
    "save_config",
]

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(UserFacingError, ValueError):
    """A recipe or override that cannot be turned into a valid config."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return [part.strip() for part in key.split(".")], value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` override written into its nested dicts.

    A key below an unset optional section (``mutual.size=2`` where ``mutual`` is null) creates the section.
    """
    result = json.loads(json.dumps(data))  # deep copy of plain data
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:  # an optional section left unset (``mixup: null``): the override creates it
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    model: type[ModelT],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> ModelT:
    """Build a typed config: ``model`` defaults < ``base`` < YAML file < overrides.

    Raises:
        ConfigError: the file is missing or malformed, or a key/value does not validate.
    """
    data: dict[str, Any] = json.loads(model().model_dump_json()) if _has_defaults(model) else {}
    if base:
        data = _deep_merge(data, base)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = _deep_merge(data, loaded)
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from exc


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML, so a run can be reproduced from the file alone."""
    Path(path).write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))


def _has_defaults(model: type[BaseModel]) -> bool:
    try:
        model()
    except ValidationError:
        return False
    return True


def format_validation_error(exc: ValidationError, title: str = "invalid config:") -> str:
    """``title`` and ``section.key: reason`` on one line for a single error, else one line per invalid field.

    A check that spans several fields (a model validator) names its keys in its own message, which is then
    shown as it is, without pydantic's ``Value error,`` prefix.
    """
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        lines.append(message if not where or message.startswith(where + ".") else f"{where}: {message}")
    if len(lines) == 1:
        return f"{title} {lines[0]}"
    return "\n".join([title, *(f"  {line}" for line in lines)])
