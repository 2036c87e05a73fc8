"""Find the training recipes shipped inside the package (``training/recipes/*.yaml``).

Recipes are package data, located through ``importlib.resources`` so they are found the same way
from a source checkout and from an installed wheel.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["available_recipes", "find_recipe", "recipe_path"]

_SUFFIX = ".yaml"


def _recipe_dir() -> Path:
    return Path(str(resources.files("training") / "recipes"))


def available_recipes() -> list[str]:
    """Names of the packaged recipes (file names without ``.yaml``), sorted."""
    folder = _recipe_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(_SUFFIX)] for p in folder.iterdir() if p.name.endswith(_SUFFIX) and p.is_file())


def recipe_path(name: str) -> Path:
    """Path of the packaged recipe ``name`` (``"quickstart"`` or ``"quickstart.yaml"``).

    Raises:
        FileNotFoundError: no such recipe; the message lists the available ones.
    """
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    path = _recipe_dir() / f"{stem}{_SUFFIX}"
    if "/" in stem or "\\" in stem or not path.is_file():
        available = ", ".join(available_recipes()) or "(none)"
        raise FileNotFoundError(f"unknown training recipe {name!r}; available recipes: {available}")
    return path


def find_recipe(spec: str | Path) -> Path:
    """A recipe given on the command line: an existing YAML file path, else a packaged recipe name.

    Raises:
        FileNotFoundError: neither a file nor a packaged recipe; the message lists the packaged ones.
    """
    path = Path(spec)
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml") and (path.parent != Path(".") or path.exists()):
        raise FileNotFoundError(f"recipe file not found: {path}")
    return recipe_path(str(spec))
