"""An OpenAI-compatible HTTP server (FastAPI) over :class:`~llmdeploy.serve.engine.ServingEngine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template, or ``chat_template=``), both with ``stream=true`` as server-sent events ending in
``data: [DONE]``; ``GET /v1/models``; ``GET /metrics`` (Prometheus text format, see
:mod:`~llmdeploy.serve.metrics`); ``GET /health``. Errors use OpenAI's body
``{"error": {"message", "type", "param", "code"}}``: 400 for requests that cannot run (bad or
unsupported parameters, a prompt longer than the context), 404 for an unknown model, 429 when
the waiting queue is full. A client that disconnects — mid-stream or while waiting for a
non-streamed answer — has its request cancelled and its KV blocks freed.

Differences from OpenAI's API, each answered with a 400 naming the parameter rather than
silently ignored: ``logprobs``, ``echo``, ``best_of`` > ``n``, non-zero presence/frequency
penalties, ``logit_bias``, tools. Sampling is greedy at ``temperature=0``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict

from ..errors import RequestError, ServerOverloadedError
from .engine import Finished, SamplingParams, ServingEngine
from .metrics import ServerMetrics


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Common):
    messages: list[dict]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None


class _NotFound(RequestError):
    pass


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class TextStream:
    """Token ids to text deltas, holding back what could still become a stop string or an
    incomplete UTF-8 character; ``stopped`` once a stop string appears (it is not emitted)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(text.rstrip("\ufffd"))
            for s in self.stops:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def flush(self) -> str:
        """The rest of the text at the end (nothing after a stop string)."""
        if self.stopped:
            return ""
        text = self._text()
        delta = text[self.emitted:]
        self.emitted = len(text)
        return delta


def build_app(model, tokenizer, *, model_name: str, engine: ServingEngine | None = None,
              chat_template: str | None = None, tenants: dict | None = None, **engine_options) -> FastAPI:
    """The server's FastAPI application. ``engine_options`` go to :class:`ServingEngine`
    (``max_batch``, ``kv_blocks``, ``max_waiting``, ``max_model_len``...). The engine thread
    starts and stops with the application (its lifespan).

    ``tenants`` (name → a BitDelta model of ``model``, from ``delta.load_delta``): the server
    answers for ``model_name`` (the base) and every tenant, the request's ``model`` field picking
    which; rows of different tenants share every batch (:class:`~llmdeploy.delta.MultiTenant`)."""
    from ..delta import MultiTenant

    metrics = ServerMetrics(model_name)
    names = [model_name]
    context = None
    if tenants:
        multi = MultiTenant(model, tenants, base_name=model_name)
        names = multi.names
        model = multi.model

        def context(reqs):
            return multi.rows([r.tag for r in reqs])
    if engine is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = {i for e in (eos, gen_eos) for i in ([e] if isinstance(e, int) else (e or []))}
        engine = ServingEngine(model, eos_token_ids=sorted(ids), metrics=metrics, forward_context=context,
                               **engine_options)
    else:
        engine.metrics = engine.metrics or metrics
        metrics = engine.metrics
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="llmdeploy", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        metrics.error(400)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}",
                      "invalid_request_error", where or None)

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: _NotFound):
        metrics.error(404)
        return _error(404, str(exc), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError):
        metrics.error(400)
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(ServerOverloadedError)
    async def _busy(request: Request, exc: ServerOverloadedError):
        metrics.error(429)
        return _error(429, str(exc), "rate_limit_error")

    @app.exception_handler(RuntimeError)
    async def _failed(request: Request, exc: RuntimeError):  # the engine failed this request
        metrics.error(500)
        return _error(500, f"generation failed: {exc}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "llmdeploy",
                                            "root": model_name, "max_model_len": engine.max_model_len}
                                           for n in names]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def _check_common(req: _Common) -> list[str]:
        if req.model not in names:
            raise _NotFound(f"the model {req.model!r} does not exist on this server; it serves "
                            f"{', '.join(map(repr, names))}")
        if req.presence_penalty or req.frequency_penalty or req.logit_bias:
            raise RequestError("presence_penalty, frequency_penalty and logit_bias are not supported by this server")
        if not 1 <= req.n <= 16:
            raise RequestError(f"n must be between 1 and 16, got {req.n}")
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def _params(req: _Common, max_tokens: int, i: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=None if req.seed is None else req.seed + i, ignore_eos=req.ignore_eos)

    def _events(prompt: list[int], params: list[SamplingParams], stops: list[str], model: str
                ) -> AsyncIterator[tuple[int, str, str | None, int]]:
        """Submit the n requests now (a 429 or 400 is raised here, before any response starts);
        returns an iterator of (choice index, text delta, finish reason or None, tokens so far)."""
        handles = []
        tag = names.index(model) if tenants else None
        try:
            for p in params:
                handles.append(engine.submit(prompt, p, tag))
        except Exception:
            for h in handles:
                engine.cancel(h)
            raise
        return _merge(handles, stops)

    async def _merge(handles, stops: list[str]) -> AsyncIterator[tuple[int, str, str | None, int]]:
        out: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h) -> None:
            text, n = TextStream(tokenizer, stops), 0
            gen = engine.events(h)
            try:
                async for item in gen:
                    if isinstance(item, Finished):
                        await out.put((i, text.flush(), item.reason, n, item.message))
                        return
                    n += 1
                    delta = text.add(item)
                    if text.stopped:
                        await out.put((i, delta, "stop", n, ""))
                        return  # leaving the stream cancels the request
                    if delta:
                        await out.put((i, delta, None, n, ""))
            finally:
                await gen.aclose()

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            finished = 0
            while finished < len(tasks):
                i, delta, reason, n, message = await out.get()
                if reason == "error":
                    raise RuntimeError(message)
                finished += reason is not None
                yield i, delta, reason, n
        finally:
            for t in tasks:
                t.cancel()
            for h in handles:  # no-op for finished requests
                engine.cancel(h)

    async def _collect(request: Request, events: AsyncIterator) -> tuple[list[str], list[str | None], int]:
        texts: dict[int, list[str]] = {}
        reasons: dict[int, str | None] = {}
        counts: dict[int, int] = {}

        async def run() -> None:
            async for i, delta, reason, n in events:
                texts.setdefault(i, []).append(delta)
                counts[i] = n
                if reason is not None:
                    reasons[i] = reason

        task = asyncio.create_task(run())
        while True:  # a client that goes away cancels its requests
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()
                break
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError
        n = len(texts)
        return ["".join(texts[i]) for i in range(n)], [reasons.get(i) for i in range(n)], sum(counts.values())

    def _sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def _stream(events, make_chunk, usage_chunk) -> AsyncIterator[str]:
        total = 0
        counts: dict[int, int] = {}
        try:
            async for i, delta, reason, n in events:
                counts[i] = n
                if delta or reason is not None:
                    yield _sse(make_chunk(i, delta, reason))
            total = sum(counts.values())
            if usage_chunk is not None:
                yield _sse(usage_chunk(total))
        except RuntimeError as e:
            metrics.error(500)
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:  # a client that went away: its requests are cancelled now, not at garbage collection
            await events.aclose()
        yield "data: [DONE]\n\n"

    def _usage(n_prompt: int, n_out: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        stops = _check_common(req)
        if req.echo or req.logprobs is not None or req.suffix is not None or (req.best_of or req.n) > req.n:
            raise RequestError("echo, logprobs, suffix and best_of > n are not supported by this server")
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise RequestError("prompt is empty")
        if len(prompts) != 1:
            raise RequestError(f"send one prompt per request ({len(prompts)} given); use n for several completions")
        prompt = prompts[0]
        ids = tokenizer(prompt).input_ids if isinstance(prompt, str) else [int(t) for t in prompt]
        max_tokens = req.max_tokens if req.max_tokens is not None else engine.max_model_len - len(ids)
        return await _respond(req, request, ids, stops, max_tokens, "cmpl", "text_completion", "text_completion",
                              lambda i, delta: {"text": delta}, lambda text: {"text": text})

    async def _respond(req: _Common, request: Request, ids: list[int], stops: list[str], max_tokens: int,
                       prefix: str, kind: str, chunk_kind: str, delta_part, final_part):
        """Run the request's n choices and answer: a whole response, or a stream of chunks
        (``delta_part(i, text)`` / ``final_part(text)`` shape a choice of each kind of endpoint)."""
        params = [_params(req, max_tokens, i) for i in range(req.n)]
        for p in params:
            engine.check(len(ids), p)
        rid, now = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": req.model}
        events = _events(ids, params, stops, req.model)
        if req.stream:
            def chunk(i, delta, reason):
                return {**head, "object": chunk_kind,
                        "choices": [{"index": i, **delta_part(i, delta), "logprobs": None, "finish_reason": reason}]}

            usage = None
            if (req.stream_options or {}).get("include_usage"):
                def usage(total):
                    return {**head, "object": chunk_kind, "choices": [], "usage": _usage(len(ids), total)}
            return StreamingResponse(_stream(events, chunk, usage), media_type="text/event-stream")
        texts, reasons, total = await _collect(request, events)
        return {**head, "object": kind,
                "choices": [{"index": i, **final_part(t), "logprobs": None, "finish_reason": r}
                            for i, (t, r) in enumerate(zip(texts, reasons))],
                "usage": _usage(len(ids), total)}

    def _chat_prompt(messages: list[dict]) -> list[int]:
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise RequestError(f"the tokenizer of {model_name!r} has no chat template: use /v1/completions, or "
                               "start the server with --chat-template FILE")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise RequestError("each message needs a role and a content")
            if isinstance(m.get("content"), list):  # OpenAI content parts: text only
                parts = m["content"]
                if any(p.get("type") != "text" for p in parts):
                    raise RequestError("only text content parts are supported")
                m["content"] = "".join(p.get("text", "") for p in parts)
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        stops = _check_common(req)
        if req.logprobs or req.top_logprobs or req.tools:
            raise RequestError("logprobs, top_logprobs and tools are not supported by this server")
        if not req.messages:
            raise RequestError("messages is empty")
        ids = _chat_prompt(req.messages)
        limit = req.max_completion_tokens or req.max_tokens
        max_tokens = limit if limit is not None else engine.max_model_len - len(ids)
        started: set[int] = set()

        def delta_part(i: int, delta: str) -> dict:
            d = {"content": delta}
            if i not in started:  # the first chunk of a choice says who speaks
                started.add(i)
                d["role"] = "assistant"
            return {"delta": d}

        return await _respond(req, request, ids, stops, max_tokens, "chatcmpl", "chat.completion",
                              "chat.completion.chunk", delta_part,
                              lambda text: {"message": {"role": "assistant", "content": text}})

    return app
