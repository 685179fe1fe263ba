"""Recipes: a YAML list of ``{method: ..., args...}`` that builds a :class:`Compose`.

The same pipeline runs from Python (``llmdeploy.recipe.load("r.yaml")(model, calib)``) and
from the CLI (``llmdeploy compress MODEL --recipe r.yaml -o OUT``). A recipe file is either a
list of steps, or a mapping with a ``steps`` list (and optional ``calibration`` settings).
Recipes shipped with the package are found by name: ``llmdeploy.recipe.load("rtn-4bit")``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .compress.base import Compose, Compressor
from .errors import ConfigError


def from_list(steps: list[dict[str, Any]]) -> Compose:
    """Build a Compose from a list of recipe entries."""
    if not isinstance(steps, list):
        raise ConfigError(f"a recipe is a list of steps, got {type(steps).__name__}")
    return Compose(Compressor.from_dict(s) for s in steps)


def parse(data: Any) -> tuple[Compose, dict[str, Any]]:
    """A Compose and the calibration settings (possibly empty) from parsed YAML."""
    if isinstance(data, dict):
        if "steps" not in data:
            raise ConfigError("a recipe mapping needs a 'steps' list")
        return from_list(data["steps"]), dict(data.get("calibration") or {})
    return from_list(data), {}


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with llmdeploy."""
    folder = resources.files("llmdeploy") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _resolve(path_or_name: str | os.PathLike) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    builtin = resources.files("llmdeploy") / "recipes" / f"{path_or_name}.yaml"
    if builtin.is_file():
        return Path(str(builtin))
    raise ConfigError(f"no recipe file {str(path_or_name)!r}; built-in recipes: {', '.join(builtin_recipes())}")


def load_with_settings(path_or_name: str | os.PathLike) -> tuple[Compose, dict[str, Any]]:
    """Like :func:`load`, also returning the recipe's ``calibration`` settings."""
    path = _resolve(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    return parse(data)


def load(path_or_name: str | os.PathLike) -> Compose:
    """Build a Compose from a YAML recipe file (or a built-in recipe name)."""
    return load_with_settings(path_or_name)[0]


def dump(compose: Compose, path: str | os.PathLike) -> None:
    """Write a Compose as a YAML recipe."""
    Path(path).write_text(yaml.safe_dump(compose.to_list(), sort_keys=False))
