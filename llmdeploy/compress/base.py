"""Compressors: a config dataclass plus a transform ``compressor(model, calib=None) -> model``.

Each compressor replaces modules in place and appends its own config to
``model.config.llmdeploy_recipe``, so that a save/load round trip knows what was applied.
``Compose`` runs several in order; ``llmdeploy.recipe`` builds one from YAML.

House rules every compressor follows:

* a compressor is a keyword-only config dataclass; what a run found (errors per round, removed
  layers...) is one typed :class:`Report` in ``compressor.report_``, never loose attributes;
* engine options (``device``, ``batch_size``, where progress is checkpointed) are declared with
  :func:`engine_field` and are not written into recipes: they say how to run, not what was done;
* a step that would touch no module raises :class:`ConfigError` naming what it skipped and why
  (:func:`require_targets`), instead of silently doing nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CalibrationDataError, ConfigError
from ..models.adapters import context_length
from .distributed import world
from .streaming import streaming

log = logging.getLogger(__name__)

METHODS: dict[str, type[Compressor]] = {}


def register_method(name: str):
    """Class decorator: make a compressor available to recipes under ``name``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        cls.method = name
        METHODS[name] = cls
        return cls

    return deco


_MODEL_LOADER: list = []


def set_model_loader(fn) -> None:
    """Installed by ``llmdeploy.io``: how a stage loads a model it names (a distillation teacher)
    without importing the layers above it."""
    _MODEL_LOADER[:] = [fn]


def load_model(name: str) -> nn.Module:
    """The model ``name`` (a zoo name, a directory, a hub id) through ``llmdeploy.load``."""
    if not _MODEL_LOADER:  # importing llmdeploy installs it; only a partial import lacks it
        raise ConfigError(f"cannot load {name!r}: no model loader installed (import llmdeploy first)")
    return _MODEL_LOADER[0](name)


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


def engine_field(default: Any = None, repr: bool = True) -> Any:  # noqa: A002 - dataclasses' own name
    """A dataclass field that says *how* to run (device, batch size, checkpoint folder), not what
    the method does: it is left out of recipes and saved manifests. ``repr=False`` for fields
    holding large objects (a teacher model, data)."""
    return dataclasses.field(default=default, repr=repr, metadata={"engine": True})


@dataclasses.dataclass
class Report:
    """What one application of a compressor did. Methods subclass it with their own typed
    fields; ``summary()`` is the one line reports print, ``to_dict()`` what result files store."""

    def summary(self) -> str:
        return ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_targets(method: str, targets: Iterable[str], skipped: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` when a step would touch no module: it names (up to three of)
    the modules it skipped and why, so a composition that cannot apply is never silently
    recorded as applied."""
    if any(True for _ in targets):
        return
    if not skipped:
        raise ConfigError(f"{method}: the model has no module this method applies to")
    reasons: dict[str, list[str]] = {}
    for name, why in skipped.items():
        reasons.setdefault(why, []).append(name)
    parts = [f"{len(names)} skipped because {why} (e.g. {', '.join(names[:3])})" for why, names in reasons.items()]
    raise ConfigError(f"{method} would change nothing: " + "; ".join(parts))


class Compressor:
    """Base of every compressor. Subclasses are keyword-only dataclasses; they implement ``apply``.

    ``validate`` runs before any work and raises :class:`ConfigError` for configurations that
    cannot work on the model (so a long run never fails half-way on a shape check). ``apply``
    stores what it found in ``self.report_`` (a :class:`Report`).
    """

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    #: has ``checkpoint_dir`` / ``resume`` fields (the CLI wires ``--resume`` to them)
    supports_resume: ClassVar[bool] = False
    #: touches the decoder blocks only through the engine's walks (``run_blockwise`` or
    #: ``walk_blocks``), one block at a time: it can run on a model whose blocks are streamed
    #: from disk (``llmdeploy.io.compress_streaming``)
    streamable: ClassVar[bool] = False
    #: gathers every statistic through the engine (or reduces it itself), so that several
    #: processes sharing the calibration windows compute the same result
    supports_distributed: ClassVar[bool] = False
    report_: Report | None = None

    def __post_init__(self) -> None:
        check_field_types(self)

    def __call__(self, model: nn.Module, calib: torch.Tensor | None = None) -> nn.Module:
        self.check_engine(model)
        self.validate(model)
        if self.needs_calibration:
            check_calibration(calib, type(self).__name__, model)
        self.report_ = None
        model = self.apply(model, calib)
        record_applied(model, self)
        return model

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` if this configuration cannot be applied to ``model``."""

    def check_engine(self, model: nn.Module) -> None:
        """Raise :class:`ConfigError` when the run asks for what this method cannot do: stream the
        blocks from disk, or share the calibration windows among several processes."""
        name = self.method or type(self).__name__
        if streaming(model) and not self.streamable:
            raise ConfigError(f"{name} cannot run on streamed blocks (it needs the whole model in memory); "
                              "run it in memory, or as a separate step after the streamed ones")
        if world()[1] > 1 and not self.supports_distributed:
            raise ConfigError(f"{name} cannot share its calibration among {world()[1]} processes; "
                              "run it in one process")

    def apply(self, model: nn.Module, calib: torch.Tensor | None) -> nn.Module:
        raise NotImplementedError

    def before_recipe(self, model: nn.Module, calib: torch.Tensor | None) -> None:
        """Called by :class:`Compose` on each of its steps before the first one runs, with the model
        as the recipe received it (PV-Tuning keeps its dense teacher here). Default: nothing."""

    def summary(self) -> str:
        """A line on what the last application did (for reports); empty when there is nothing to say."""
        return self.report_.summary() if self.report_ is not None else ""

    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, **fields}``: the recipe entry that rebuilds this compressor (engine
        options such as ``device`` and ``batch_size`` are left out)."""
        fields = {}
        if dataclasses.is_dataclass(self):
            fields = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                      if not f.metadata.get("engine")}
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
        try:
            return cls(**args)
        except TypeError as e:
            raise ConfigError(f"method {entry['method']!r}: {e}") from None


def _accepts(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (the simple types config fields use)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is not None:
        tp = origin
    if tp in (list, tuple):  # YAML gives lists, Python code often tuples
        return isinstance(value, (list, tuple))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def check_field_types(config: Any) -> None:
    """Raise :class:`ConfigError` for a config field whose value has the wrong type (``bits:
    "four"`` in a YAML recipe), naming the field, the value and the expected type."""
    if not dataclasses.is_dataclass(config):
        return
    try:
        hints = typing.get_type_hints(type(config))
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check
        return
    for f in dataclasses.fields(config):
        tp = hints.get(f.name)
        value = getattr(config, f.name)
        if tp is None or _accepts(value, tp):
            continue
        name = getattr(config, "method", "") or type(config).__name__
        raise ConfigError(f"{name}: {f.name}={value!r} ({type(value).__name__}) is not a valid value; "
                          f"expected {getattr(tp, '__name__', None) or str(tp).replace('typing.', '')}")


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
            check_calibration(calib, "this recipe", model)
        for step in self.steps:
            step.before_recipe(model, calib)
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


def check_calibration(calib: torch.Tensor | None, who: str, model: nn.Module | None = None) -> None:
    """Calibration data must be a 2-D tensor of token ids (n_samples, seq_len) that fits the
    model (vocabulary, context length)."""
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
    if calib.shape[0] < 1 or calib.shape[1] < 2:
        raise CalibrationDataError(f"calibration data has shape {tuple(calib.shape)}: need at least one "
                                   "window of two or more tokens")
    config = getattr(model, "config", None)
    context = context_length(model) if model is not None else None
    if context is not None and calib.shape[1] > context:
        raise CalibrationDataError(
            f"calibration windows of {calib.shape[1]} tokens are longer than the model's context "
            f"({context} positions); use seq_len <= {context}"
        )
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and calib.numel() and (int(calib.max()) >= vocab or int(calib.min()) < 0):
        raise CalibrationDataError(
            f"calibration data holds token ids outside the model's vocabulary (0..{vocab - 1}): "
            "tokenize it with this model's tokenizer"
        )
