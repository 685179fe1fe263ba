"""Exceptions raised by llmdeploy, each naming the problem and how to fix it."""

from __future__ import annotations


class LLMDeployError(Exception):
    """Base class of every error llmdeploy raises on purpose."""


class UnknownModelError(LLMDeployError, ValueError):
    """A model name that is neither a zoo name, a local path nor a reachable hub id."""


class UnsupportedArchitectureError(LLMDeployError, ValueError):
    """The model's architecture has no adapter."""


class ConfigError(LLMDeployError, ValueError):
    """A compressor configuration that cannot work on this model (checked before any work)."""


class CheckpointError(LLMDeployError, ValueError):
    """A saved directory that is incomplete, corrupt, or not an llmdeploy/Hugging Face checkpoint."""


class CorpusUnavailableError(LLMDeployError, RuntimeError):
    """A corpus that cannot be read here (offline, missing file, package not fetchable)."""


class CalibrationDataError(LLMDeployError, ValueError):
    """Calibration data that cannot be used (wrong shape, NaN activations, too short a corpus)."""
