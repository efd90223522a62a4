"""The FastAPI application: OpenAI routes over the scheduler, SSE streams, errors, auth.

Handlers never call into the engine: they check the request (:mod:`._protocol`), tokenize it
on a worker thread, and submit a :class:`~._scheduler.Job` whose sink hands each event to the
event loop with ``loop.call_soon_threadsafe``. A handler watches its connection while it
waits: a client that goes away cancels its job, which frees the slot at the next step.
Log-probability entries arrive as their own events just before the text of their tokens: a
stream chunk carries the entries that came since the chunk before it, the final chunk (the
one with ``finish_reason``) the rest, so each token's entry is sent exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple, Union

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ._defaults import DEFAULT_FLASH_ATTN, DEFAULT_MAX_BODY, DEFAULT_PROMPT_BUDGET, DEFAULT_STEP_MS, FLASH_ATTN
from .._engine import Engine
from ..chat_template import apply_chat_template
from ..config import GenerationConfig
from ..errors import ChatTemplateError
from ..lowlevel.model import LlamaModel
from ._logprobs import CompletionLogprobs, chat_logprobs
from ._metrics import Metrics
from ._protocol import APIError, Completion, error_body, parse_chat, parse_completion, parse_embeddings
from ._scheduler import Job, QueueFull, Scheduler, ShuttingDown, Usage

__all__ = ["create_app", "ServerSettings"]



class ServerSettings:
    """What ``create_app`` builds: the model, the slots and the limits (see ``main --help``)."""

    def __init__(self, model_path: Union[str, "os.PathLike[str]", None] = None, *, parallel: int = 4,
                 ctx_size: Optional[int] = None, prompt_budget: int = DEFAULT_PROMPT_BUDGET, max_queue: int = 64,
                 api_key: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY, n_threads: Optional[int] = None,
                 alias: Optional[str] = None, retry_after: int = 1,
                 flash_attn: Optional[bool] = FLASH_ATTN[DEFAULT_FLASH_ATTN],
                 step_ms: int = DEFAULT_STEP_MS) -> None:
        if model_path is None:
            from ..models import default_model_path

            model_path = default_model_path()
        for name, value, low in (("parallel", parallel, 1), ("prompt_budget", prompt_budget, 1),
                                 ("max_queue", max_queue, 0), ("max_body", max_body, 1), ("step_ms", step_ms, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.model_path = str(model_path)
        self.parallel = parallel
        self.ctx_size = ctx_size if ctx_size is not None else 2048 * parallel
        if isinstance(self.ctx_size, bool) or not isinstance(self.ctx_size, int) or self.ctx_size < 8 * parallel:
            raise ValueError(f"ctx_size must be an int >= 8 per slot ({8 * parallel}), got {ctx_size!r}")
        if flash_attn not in (None, True, False):
            raise ValueError(f"flash_attn must be True, False or None (llama.cpp's choice), got {flash_attn!r}")
        self.prompt_budget = prompt_budget
        self.flash_attn = flash_attn
        self.step_ms = step_ms
        self.max_queue = max_queue
        self.api_key = api_key or None
        self.max_body = max_body
        self.n_threads = n_threads
        self.alias = alias or os.path.splitext(os.path.basename(self.model_path))[0]
        self.retry_after = retry_after


class _State:
    """The loaded model, the engine's scheduler, the embedder and the metrics of one app."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model = LlamaModel(settings.model_path)
        self.vocab = self.model.vocab
        # One step is one micro-batch: the prompt budget plus a row per generating slot (or, with
        # flash attention off, up to 512 prompt rows when no slot is generating). Then llama.cpp
        # never splits a step, so a request's sums do not depend on its neighbours.
        n_batch = settings.prompt_budget + settings.parallel
        if settings.flash_attn is False:
            n_batch = max(n_batch, 512)
        try:
            engine = Engine(self.model, n_ctx=settings.ctx_size, n_seq_max=settings.parallel, n_batch=n_batch,
                            n_ubatch=n_batch, n_threads=settings.n_threads, prompt_budget=settings.prompt_budget,
                            keep_prefixes=True, flash_attn=settings.flash_attn,
                            step_time=settings.step_ms / 1000 if settings.step_ms else None)
        except BaseException:
            self.model.close()
            raise
        self.capacity = engine.seq_capacity
        self.metrics = Metrics(settings.parallel)
        self.scheduler = Scheduler(engine, self.metrics, settings.max_queue)
        self.created = int(time.time())
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self._mailbox: Optional[_Mailbox] = None

    def mailbox(self) -> "_Mailbox":
        """The mailbox of the running event loop (made on first use: the app may change loops)."""
        loop = asyncio.get_running_loop()
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = _Mailbox(loop)
        return self._mailbox

    # -- worker-thread helpers (tokenizing, templates, embeddings) ----------------------------
    def prepare(self, request: Completion) -> Tuple[List[int], GenerationConfig]:
        """The request's prompt tokens and generation config; APIError for what cannot run."""
        if request.messages is not None:
            param = "messages"
            try:
                text = apply_chat_template(self.model, request.messages)
            except (ChatTemplateError, ValueError, TypeError) as error:
                raise APIError(400, f"the messages cannot be rendered with the model's chat template: {error}",
                               param) from None
            tokens = self.vocab.tokenize(text, add_special=False, parse_special=True)
            bos = self.vocab.bos
            if self.vocab.add_bos and bos >= 0 and tokens[:1] != [bos]:
                tokens.insert(0, bos)
        elif isinstance(request.prompt, str):
            param = "prompt"
            tokens = self.vocab.tokenize(request.prompt, add_special=True, parse_special=True)
        else:
            param = "prompt"
            tokens = list(request.prompt)
            try:
                self.vocab.check_tokens(tokens)
            except (ValueError, TypeError) as error:
                raise APIError(400, str(error), param) from None
        if not tokens:
            raise APIError(400, "the prompt is empty after tokenizing", param)
        if len(tokens) >= self.capacity:
            s = self.settings
            raise APIError(400, f"the prompt has {len(tokens)} tokens but a slot holds {self.capacity} "
                                f"(--ctx-size {s.ctx_size} / --parallel {s.parallel}); shorten the prompt or "
                                "raise --ctx-size", param, code="context_length_exceeded")
        bias = request.sampling.get("logit_bias")
        if bias:
            try:
                self.vocab.check_tokens(bias)
            except (ValueError, TypeError) as error:
                raise APIError(400, f"'logit_bias': {error}", "logit_bias") from None
        max_tokens = request.max_tokens if request.max_tokens is not None else self.capacity
        try:
            config = GenerationConfig(max_tokens=max_tokens, stop_sequences=request.stop,
                                      json_schema=request.response_format, **request.sampling)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error), "response_format" if request.response_format is not None else None) \
                from None
        return tokens, config

    def embed(self, texts: List[str]) -> Tuple[Any, int]:
        """Vectors for ``texts`` in an embedding context of its own, one request at a time.

        Runs on a worker thread, which outlives the request: ``Embedder.embed`` frees the pool
        of OpenMP workers its decodes made there, or their idle workers would make the
        scheduler's decodes sleep at every barrier instead of spinning.
        """
        from ..embeddings import Embedder

        with self._embed_lock:
            if self._embedder is None:
                self._embedder = Embedder(self.model, n_ctx=min(self.capacity, 2048), n_threads=self.settings.n_threads)
            try:
                vectors = self._embedder.embed(texts)
            except ValueError as error:
                raise APIError(400, str(error), "input") from None
            n_tokens = sum(len(self.vocab.tokenize(text, add_special=True)) for text in texts)
            return vectors, n_tokens

    def close(self) -> None:
        self.scheduler.stop()
        self.scheduler.join(5.0)
        with self._embed_lock:
            if self._embedder is not None:
                self._embedder.close()
        if not self.scheduler.alive:
            self.model.close()


def create_app(model_path: Union[str, "os.PathLike[str]", None] = None, **settings: Any) -> FastAPI:
    """The FastAPI app serving ``model_path`` (the default model when None).

    Keyword settings are :class:`ServerSettings`' (``parallel``, ``ctx_size``, ``prompt_budget``,
    ``max_queue``, ``api_key``, ``max_body``, ``n_threads``, ``alias``). The model loads now;
    the scheduler thread starts with the app (its lifespan) and stops with it.
    """
    state = _State(ServerSettings(model_path, **settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    app = FastAPI(title="cyllama_cffi", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _routes(app, state)
    return app


# -- errors and auth ------------------------------------------------------------------------------

def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body, status_code=error.status, headers=error.headers)


def _check_key(state: _State, request: Request) -> None:
    key = state.settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


async def _json_body(state: _State, request: Request) -> Any:
    """The request's JSON, read within the size limit (413 past it, 400 if not JSON)."""
    limit = state.settings.max_body
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None


# -- streams --------------------------------------------------------------------------------------

class _Mailbox:
    """Hands events from the scheduler thread to one event loop, one wake-up for many events.

    A step gives every running job an event; rather than waking the loop for each (a write to
    its self-pipe, a pass of the loop), the first event posted while the box is empty schedules
    a drain, and the events posted before the loop runs it ride along.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: List[Tuple["asyncio.Queue[Tuple[str, Any]]", Tuple[str, Any]]] = []

    def post(self, queue: "asyncio.Queue[Tuple[str, Any]]", event: Tuple[str, Any]) -> None:  # any thread
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:  # a drain is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    def _drain(self) -> None:  # the event loop
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


class _Events:
    """The events of one job, handed from the scheduler thread to the event loop."""

    def __init__(self, mailbox: _Mailbox) -> None:
        self.mailbox = mailbox
        self.queue: "asyncio.Queue[Tuple[str, Any]]" = asyncio.Queue()

    def sink(self, kind: str, value: Any) -> None:  # the scheduler thread
        self.mailbox.post(self.queue, (kind, value))


async def _watch_disconnect(request: Request, on_gone: Callable[[], None]) -> None:
    """Wait for the client to go away (the body has been read), then call ``on_gone``."""
    receive = request.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_gone()
            return


class _EventStream(Response):
    """A ``text/event-stream`` response that cancels its job when the client goes away.

    Not Starlette's StreamingResponse: that notices a disconnect only by the ASGI version's
    rules, and a request still in its prompt writes nothing for a long time. Here a task
    listens for ``http.disconnect`` from the first byte to the last.
    """

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], request: Request, on_gone: Callable[[], None]) -> None:
        super().__init__(headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # chunked
        self.chunks = chunks
        self.request = request
        self.on_gone = on_gone

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(_watch_disconnect(self.request, self.on_gone))
        try:
            async for chunk in self.chunks:
                try:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except OSError:
                    self.on_gone()
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass
        finally:
            watcher.cancel()


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"


def _usage(usage: Usage) -> Dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


# -- routes ---------------------------------------------------------------------------------------

def _routes(app: FastAPI, state: _State) -> None:
    metrics = state.metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        metrics.request(request.url.path, f"error_{error.status}")
        return _error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        metrics.request(request.url.path, "error_500")
        return JSONResponse(error_body(f"internal error: {type(error).__name__}: {error}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> Dict[str, Any]:
        return {"status": "ok" if state.scheduler.alive else "stopping", "slots": state.settings.parallel}

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        _check_key(state, request)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Dict[str, Any]:
        _check_key(state, request)
        return {"object": "list", "data": [{"id": state.settings.alias, "object": "model",
                                             "created": state.created, "owned_by": "cyllama_cffi"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _check_key(state, request)
        return await _generate(state, request, parse_completion(await _json_body(state, request)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _check_key(state, request)
        return await _generate(state, request, parse_chat(await _json_body(state, request)), chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Dict[str, Any]:
        _check_key(state, request)
        texts, encoding = parse_embeddings(await _json_body(state, request))
        vectors, n_tokens = await run_in_threadpool(state.embed, texts)
        data = []
        for index, vector in enumerate(vectors):
            value: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") if encoding == "base64" \
                else [float(x) for x in vector]
            data.append({"object": "embedding", "index": index, "embedding": value})
        metrics.request("/v1/embeddings", "ok")
        return {"object": "list", "data": data, "model": state.settings.alias,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


async def _generate(state: _State, request: Request, order: Completion, chat: bool) -> Response:
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    tokens, config = await run_in_threadpool(state.prepare, order)
    shape_logprobs = None  # entries -> this endpoint's logprobs object (None: not asked)
    if order.logprobs is not None:
        if chat:
            shape_logprobs = chat_logprobs
        else:
            prompt = order.prompt if isinstance(order.prompt, str) else \
                await run_in_threadpool(state.vocab.detokenize, tokens)
            shape_logprobs = CompletionLogprobs(len(prompt)).piece
    events = _Events(state.mailbox())
    job = Job(tokens, config, events.sink, logprobs=order.logprobs)
    try:
        state.scheduler.submit(job)
    except QueueFull as full:
        raise APIError(429, f"the server is busy: {full}; retry later", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": str(state.settings.retry_after)}) from None
    except ShuttingDown as stopping:
        raise APIError(503, str(stopping), type="server_error") from None
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = order.model or state.settings.alias
    metrics = state.metrics

    def gone() -> None:
        job.cancel()

    def outcome(reason: Any) -> str:
        return str(reason) if reason is not None else "error"

    if order.stream:
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        pending: List[Any] = []  # entries of the tokens since the last chunk

        def chunk(text: Optional[str], finish: Optional[str]) -> Dict[str, Any]:
            logprobs = None
            if shape_logprobs is not None and (text is not None or finish is not None):  # not the role chunk
                logprobs = shape_logprobs(pending)
                pending.clear()
            if chat:
                delta: Dict[str, Any] = {} if text is None else {"content": text}
                choice: Dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return {"id": ident, "object": kind_name, "created": created, "model": model, "choices": [choice]}

        async def chunks() -> AsyncIterator[bytes]:
            try:
                if chat:
                    first = chunk(None, None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield _sse(first)
                while True:
                    kind, value = await events.queue.get()
                    if kind == "logprobs":  # the entries of the next chunk's tokens (or the final one's)
                        pending.extend(value)
                        continue
                    if kind == "text":
                        yield _sse(chunk(value, None))
                        continue
                    if kind == "error":
                        metrics.request(endpoint, "error")
                        yield _sse(error_body(value, "server_error"))
                    else:
                        reason, usage = value
                        metrics.request(endpoint, outcome(reason))
                        yield _sse(chunk(None, str(reason)))
                        if order.include_usage:
                            last = {"id": ident, "object": kind_name, "created": created, "model": model,
                                    "choices": [], "usage": _usage(usage)}
                            yield _sse(last)
                    yield b"data: [DONE]\n\n"
                    return
            finally:
                job.cancel()  # the response ended early (the client went away): stop the work

        return _EventStream(chunks(), request, gone)

    def stop_waiting() -> None:
        job.cancel()
        events.sink("gone", None)

    watcher = asyncio.ensure_future(_watch_disconnect(request, stop_waiting))
    pieces: List[str] = []
    entries: List[Any] = []
    try:
        while True:
            kind, value = await events.queue.get()
            if kind == "text":
                pieces.append(value)
            elif kind == "logprobs":
                entries.extend(value)
            elif kind == "gone":  # the client left; the job's own end still comes, ignore it
                metrics.request(endpoint, "disconnected")
                return Response(status_code=499)
            elif kind == "error":
                raise APIError(500, value, type="server_error")
            else:
                reason, usage = value
                break
    finally:
        watcher.cancel()
        job.cancel()
    metrics.request(endpoint, outcome(reason))
    text = "".join(pieces)
    logprobs = shape_logprobs(entries) if shape_logprobs is not None else None
    if chat:
        choice: Dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": logprobs, "finish_reason": str(reason)}
        kind_name = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": str(reason)}
        kind_name = "text_completion"
    return JSONResponse({"id": ident, "object": kind_name, "created": created, "model": model,
                         "choices": [choice], "usage": _usage(usage)})
