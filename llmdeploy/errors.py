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


class DownloadError(LLMDeployError, RuntimeError):
    """A file that ships inside a package (the embedded model, a corpus) could not be fetched."""


class TrainingDivergedError(LLMDeployError, FloatingPointError):
    """An optimisation produced NaN/inf (a loss, a Hessian that stays singular): lower the learning
    rate, raise the damping, or check the calibration data."""


class EvaluationError(LLMDeployError, ValueError):
    """An evaluation that cannot run as asked (too little text for one window, an unknown task)."""


class ResultsError(LLMDeployError, ValueError):
    """A results folder or file that cannot be read into a report."""


class KVCacheFullError(LLMDeployError, RuntimeError):
    """The KV cache has no free block for a request: raise ``num_blocks``, lower the batch, or free
    finished sequences (or, with DistAttention, add processes that lend their blocks)."""


class DistributedKVError(LLMDeployError, RuntimeError):
    """A process of a DistAttention group stopped answering (it died or timed out); the KV blocks it
    held are lost, so the group must be restarted."""


class RequestError(LLMDeployError, ValueError):
    """A serving request that cannot be run as sent (HTTP 400): bad parameters, a prompt longer
    than the context, an unsupported option."""


class ServerOverloadedError(LLMDeployError, RuntimeError):
    """The server's queue of waiting requests or tokens is full (HTTP 429): retry later, or raise
    ``--max-waiting`` / ``--max-waiting-tokens``."""
