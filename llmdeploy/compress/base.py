"""Compressors: a config dataclass plus a transform ``compressor(model, calib=None) -> model``.

Each compressor replaces modules in place and appends its own config to
``model.config.llmdeploy_recipe``, so that a save/load round trip knows what was applied.
``Compose`` runs several in order; ``llmdeploy.recipe`` builds one from YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CalibrationDataError, ConfigError

log = logging.getLogger(__name__)

METHODS: dict[str, type[Compressor]] = {}


def register_method(name: str):
    """Class decorator: make a compressor available to recipes under ``name``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        cls.method = name
        METHODS[name] = cls
        return cls

    return deco


def methods() -> list[str]:
    """Names of the registered compression methods."""
    return sorted(METHODS)


def get_method(name: str) -> type[Compressor]:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown compression method {name!r}; available: {', '.join(methods())}"
        ) from None


class Compressor:
    """Base of every compressor. Subclasses are dataclasses; they implement ``apply``.

    ``validate`` runs before any work and raises :class:`ConfigError` for configurations that
    cannot work on the model (so a long run never fails half-way on a shape check).
    """

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def __call__(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        self.validate(model)
        if self.needs_calibration:
            check_calibration(calib, type(self).__name__)
        model = self.apply(model, calib)
        record_applied(model, self)
        return model

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` if this configuration cannot be applied to ``model``."""

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def summary(self) -> str:
        """A line on what the last application did (for reports); empty when there is nothing to say."""
        return ""

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, **fields}``: the recipe entry that rebuilds this compressor."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"method": self.method, **fields}

    @staticmethod
    def from_dict(entry: dict[str, Any]) -> Compressor:
        """Build a compressor from a recipe entry ``{"method": ..., args...}``."""
        if not isinstance(entry, dict) or "method" not in entry:
            raise ConfigError(f"a recipe entry must be a mapping with a 'method' key, got {entry!r}")
        args = {k: v for k, v in entry.items() if k != "method"}
        cls = get_method(entry["method"])
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = set(args) - names
        if unknown:
            raise ConfigError(
                f"method {entry['method']!r} has no argument(s) {sorted(unknown)}; "
                f"its arguments are {sorted(names)}"
            )
        return cls(**args)


class Compose(Compressor):
    """Apply compressors in order: ``Compose([RTN(4), ...])(model, calib)``."""

    method = "compose"

    def __init__(self, steps: Iterable[Compressor]) -> None:
        self.steps: list[Compressor] = list(steps)
        for s in self.steps:
            if not isinstance(s, Compressor):
                raise ConfigError(f"Compose takes compressors, got {type(s).__name__}")

    def __call__(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        if any(s.needs_calibration for s in self.steps):
            check_calibration(calib, "this recipe")
        for step in self.steps:
            log.info("applying %s", step.to_dict())
            model = step(model, calib)
        return model

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return any(s.needs_calibration for s in self.steps)

    def to_list(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]

    def __repr__(self) -> str:
        return f"Compose({self.steps!r})"

    def __len__(self) -> int:
        return len(self.steps)


def record_applied(model: nn.Module, compressor: Compressor) -> None:
    """Append the compressor's recipe entry to ``model.config.llmdeploy_recipe``."""
    config = getattr(model, "config", None)
    if config is None:
        return
    recipe = list(getattr(config, "llmdeploy_recipe", None) or [])
    recipe.append(copy.deepcopy(compressor.to_dict()))
    config.llmdeploy_recipe = recipe


def applied_recipe(model: nn.Module) -> list[dict[str, Any]]:
    """The recipe entries applied to ``model`` so far (empty for a dense model)."""
    return list(getattr(getattr(model, "config", None), "llmdeploy_recipe", None) or [])


def check_calibration(calib: torch.Tensor | None, who: str) -> None:
    """Calibration data must be a 2-D tensor of token ids (n_samples, seq_len)."""
    if calib is None:
        raise CalibrationDataError(
            f"{who} needs calibration data: pass calib=llmdeploy.data.calibration(tokenizer, "
            "'shakespeare', n_samples=128, seq_len=512, seed=0)"
        )
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2:
        raise CalibrationDataError(
            f"calibration data must be a 2-D tensor of token ids (n_samples, seq_len), got "
            f"{type(calib).__name__} {tuple(getattr(calib, 'shape', ()))}"
        )
    if calib.dtype.is_floating_point:
        if not torch.isfinite(calib).all():
            raise CalibrationDataError("calibration data contains NaN or inf; pass token ids")
        raise CalibrationDataError(f"calibration data must hold integer token ids, got {calib.dtype}")

