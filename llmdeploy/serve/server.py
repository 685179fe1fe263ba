"""Running the server: :func:`serve` (what ``llmdeploy serve`` calls) and
:class:`BackgroundServer` (uvicorn in a thread on a free port, for notebooks and tests)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..errors import ConfigError
from .app import build_app


def load_app(model: str, *, served_model_name: str | None = None, chat_template: str | None = None,
             tenants: dict[str, str] | None = None, drafter: str | None = None, **engine_options):
    """Load ``model`` (any name or path :func:`llmdeploy.load` takes: dense or compressed) and
    build the server's app; ``tenants`` maps served names to BitDelta delta files of it
    (``delta.save_delta``), each answered when a request names it; ``drafter``: a folder holding
    a trained drafter (``llmdeploy drafter train``) for speculative decoding. What ``llmdeploy
    serve`` runs, in one process or on every Ray Serve replica."""
    from ..decode import load_drafter
    from ..delta import load_delta
    from ..io import load

    m, tok = load(model)
    loaded = {name: load_delta(m, path) for name, path in (tenants or {}).items()}
    if drafter is not None:
        engine_options["drafter"] = load_drafter(drafter)
    return build_app(m, tok, model_name=served_model_name or model, chat_template=chat_template,
                     tenants=loaded or None, **engine_options)


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options) -> None:
    """:func:`load_app` (``options``: its arguments), served by uvicorn until interrupted."""
    uvicorn.run(load_app(model, **options), host=host, port=port, log_level=log_level)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """``with BackgroundServer(app) as url:`` — the app served by uvicorn in a daemon thread on a
    free port of ``host``; ``url`` is its base (``http://127.0.0.1:PORT``)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0) -> None:
        self.app, self.host, self.port, self.timeout = app, host, port or free_port(host), timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.timeout:
                raise ConfigError(f"the server did not start on {self.url} within {self.timeout:.0f} s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(self.timeout)
