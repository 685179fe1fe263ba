"""Serving: an OpenAI-compatible HTTP server with continuous batching on the paged KV cache and
Prometheus metrics under vLLM's names.

- :class:`ServingEngine` (:mod:`.engine`): the engine thread, limits, cancellation.
- :func:`build_app` (:mod:`.app`): the FastAPI application (``/v1/completions``,
  ``/v1/chat/completions``, ``/v1/models``, ``/metrics``, ``/health``).
- :func:`serve`, :class:`BackgroundServer` (:mod:`.server`): run it (``llmdeploy serve``).
"""

from .app import build_app
from .engine import Finished, SamplingParams, ServingEngine, kv_bytes_per_token
from .metrics import ServerMetrics
from .server import BackgroundServer, free_port, load_app, serve

__all__ = ["BackgroundServer", "Finished", "SamplingParams", "ServerMetrics", "ServingEngine", "build_app",
           "free_port", "kv_bytes_per_token", "load_app", "serve"]
