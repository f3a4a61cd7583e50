"""Trained adapters behind an HTTP API (FastAPI + uvicorn), many adapters on one base, a page; `run_server` runs
it until SIGTERM (`budgetune serve`).

Endpoints: POST /v1/classify, GET /v1/adapters, GET /health, GET /metrics (Prometheus), GET / (the page), /docs.
Every answer carries an X-Request-ID; every bad request is a 4xx naming the header or field at fault; load beyond
--max_queue_texts queued texts, or a wait past --request_timeout, is a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

try:
    from fastapi import FastAPI, Request, Security
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import APIKeyHeader
    from pydantic import BaseModel, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra
    raise ImportError(f"budgetune serve needs FastAPI and uvicorn: pip install 'budgetune[serve]' ({e})") from e

from budgetune.errors import ConfigError, RequestError
from budgetune.inference.runner import nonfinite_rows
from budgetune.serve.answers import AnyResponse, ClassifyRequest, answer, check_pairs
from budgetune.serve.queue import Backlog, DynamicBatcher, running
from budgetune.serve.registry import Registry, parse_runs
from budgetune.serve.telemetry import CONTENT_TYPE, Metrics
from budgetune.textcheck import lone_surrogate

# Pages and descriptions that hold no data: a browser cannot send the key when it opens them (the page asks for it).
PUBLIC_PATHS = {"/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc", "/health"}
KNOWN_PATHS = PUBLIC_PATHS | {"/v1/classify", "/v1/adapters", "/metrics"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a caller's own X-Request-ID, kept when it looks like this
MAX_ERRORS = 20  # field errors listed in one answer
ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # how one reaches a JSON body (UTF-8 cannot carry it)
ERROR_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 503: "not_ready"}
log = logging.getLogger("uvicorn.error")  # beside uvicorn's own lines, at its --log_level


@dataclass
class ServeOptions:
    """Limits and batching; the command line's flags."""

    api_key: str | None = None
    max_texts: int = 64
    max_chars: int = 2000
    max_body_bytes: int = 1 << 20
    batch_wait_ms: float = 5.0
    max_batch_tokens: int = 4096
    dynamic_batching: bool = True
    max_queue_texts: int = 1024
    request_timeout: float = 30.0


@dataclass
class ServeState:
    registry: Registry
    options: ServeOptions
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    load_error: BaseException | None = None
    batcher: DynamicBatcher | None = None
    tokenizer_pool: ThreadPoolExecutor | None = None
    on_fatal: Callable[[], None] | None = None  # the command stops uvicorn when loading fails
    backlog: Backlog = field(init=False)

    def __post_init__(self):
        self.backlog = Backlog(self.options.max_queue_texts)


class AdapterInfo(BaseModel):
    name: str
    base_model: str
    method: str
    trainable_parameters: int | None
    labels: list[str] = Field(description="the classes (single_label), the labels (multi_label) or the targets "
                              "(regression)")
    task: str = Field(description="single_label, multi_label or regression: which answer /v1/classify gives")
    text_pair: str | None = Field(description="the run was trained on text pairs (this column): requests send a "
                                  "text_pair per text; null: single texts")
    validation_accuracy: float | None
    max_seq_length: int = Field(description="tokens the model reads; later tokens are not seen (as in training)")
    served: str = Field(description="merged (alone on its base), mixed (one forward for a batch of several "
                        "adapters) or grouped (one forward per adapter on the shared base)")


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str = Field(description="loading, ready or failed")
    ready: bool
    adapters: int
    precision: str = Field(description="what the models compute in (fp32, bf16, fp16 or int8) and why")
    message: str | None = None


class FieldError(BaseModel):
    field: str | None
    message: str


class ErrorResponse(BaseModel):
    error: str
    field: str | None = Field(description="the request field at fault (first of `errors`), e.g. texts[3]")
    message: str
    errors: list[FieldError] = Field(description=f"every field at fault (the first {MAX_ERRORS})")
    request_id: str = Field(description="this request's id, also in the X-Request-ID header and the server log")


def field_name(loc: tuple) -> str:
    """('body', 'texts', 3) -> 'texts[3]'; a key longer than 64 characters (a client's) is cut, marked '…'."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        part = part if isinstance(part, int) or len(str(part)) <= 64 else f"{str(part)[:64]}…"
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def error_response(state: ServeState, e: RequestError, request_id: str, headers: dict | None = None) -> JSONResponse:
    """The JSON answer to a failed request (counted in /metrics); a 503 says when to retry."""
    state.metrics.count_error(e.status, e.field)
    body = ErrorResponse(error=e.kind or ERROR_KINDS.get(e.status, "error"), field=e.field, message=str(e),
                         errors=e.errors[:MAX_ERRORS], request_id=request_id)
    if e.status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONResponse(body.model_dump(), status_code=e.status, headers=headers)


def validation_error(e: ValidationError | RequestValidationError) -> RequestError:
    errors = [{"field": field_name(tuple(d["loc"])), "message": d["msg"]} for d in e.errors()]
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return RequestError(422, first["field"], f"{first['field']}: {first['message']}", errors)


def check_content_type(content_type: str | None) -> None:
    """JSON in UTF-8, or a 415 naming the header; a body sent without Content-Type is read as JSON."""
    if content_type is None:
        return
    media, *params = (part.strip() for part in content_type.lower().split(";"))
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise RequestError(415, "Content-Type", f"Content-Type: {media or '(empty)'} is not JSON; send the body as "
                           "JSON with `Content-Type: application/json`", kind="unsupported_media_type")
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            raise RequestError(415, "Content-Type", f"Content-Type: charset {value.strip()} is not UTF-8; send UTF-8 "
                               "JSON as `Content-Type: application/json`", kind="unsupported_media_type")


def not_json(constant: str):
    raise RequestError(400, "body", f"body: not valid JSON ({constant} is not JSON: numbers are finite)")


def parse_json(raw: bytes) -> object:
    """UTF-8 JSON with finite numbers and no unpaired surrogate, or a 4xx naming the body, or the field, at fault."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, "body", f"body: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = json.loads(text, parse_constant=not_json)
    except RequestError:
        raise
    except json.JSONDecodeError as e:
        raise RequestError(400, "body", f"body: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise RequestError(400, "body", "body: JSON nested too deeply (a request is an object of strings and a "
                           "list of strings)") from None
    except ValueError:  # past the decoder's own errors, only an integer longer than Python converts
        raise RequestError(400, "body", f"body: a number with more than {sys.get_int_max_str_digits()} digits"
                           ) from None
    if ESCAPED_SURROGATE.search(raw):
        refuse_lone_surrogate(data)
    return data


def refuse_lone_surrogate(data: object) -> None:
    """A 422 naming the first field (breadth first) with an unpaired UTF-16 surrogate, which is no text at all."""
    found = lone_surrogate(data)
    if found is None:
        return
    where = field_name(found.path)
    if found.in_key:
        raise RequestError(422, where, f"{where}: an object key is not valid Unicode (an unpaired "
                           "surrogate: each \\uD800-\\uDFFF escape must be half of a pair)")
    raise RequestError(422, where, f"{where}: not valid Unicode: unpaired surrogate "
                       f"\\u{ord(found.text[found.index]):04x} at character {found.index} (each \\uD800-\\uDFFF "
                       "escape must be half of a pair)")


def read_request(raw: bytes, content_type: str | None, max_texts: int) -> ClassifyRequest:
    """The body as a ClassifyRequest, or a 4xx naming the header or field at fault."""
    check_content_type(content_type)
    data = parse_json(raw)
    for key in ("texts", "text_pair"):  # before each one is checked: no list of 200,000 errors
        texts = data.get(key) if isinstance(data, dict) else None
        if isinstance(texts, list) and len(texts) > max_texts:
            raise RequestError(422, key, f"{key}: at most {max_texts} texts per request (got {len(texts)}; "
                               "--max_texts)")
    try:
        return ClassifyRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def require_ready(state: ServeState) -> None:
    if not state.ready:
        what = f"loading failed: {state.load_error}" if state.load_error else "the models are still loading"
        raise RequestError(503, None, f"not ready: {what}")


def header(scope, name: bytes) -> str | None:
    """A request header's value (latin-1, as HTTP carries it), or None."""
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == name), None)


def raw_header(scope, name: bytes) -> bytes | None:
    """A request header's value as sent (bytes), or None."""
    return next((v for k, v in scope["headers"] if k.lower() == name), None)


def bearer_token(value: bytes | None) -> bytes | None:
    """The token of `Authorization: Bearer TOKEN` (the scheme in any case, RFC 7235), else None."""
    scheme, _, token = (value or b"").strip().partition(b" ")
    return token.strip() or None if scheme.lower() == b"bearer" else None


def request_id(scope) -> str:
    """The caller's X-Request-ID when it is a plain token (letters, digits, . _ : -), else a fresh one."""
    given = header(scope, b"x-request-id")
    return given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def request_id_of(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "")


class Guard:
    """Request ids, API key, body size, request metrics and the answer to a bug, around the app (ASGI middleware).

    Every response carries X-Request-ID; a bug's 500 names it, and the server log's line with the traceback too.
    """

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid  # the handlers' request.state.request_id
        metrics, status, started = self.state.metrics, 500, False
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def send_tagged(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        metrics.in_flight += 1
        try:
            await self.guarded(scope, receive, send_tagged)
        except Exception as e:
            log.exception("request %s: %s %r answered 500 (internal error)", rid, scope["method"], scope["path"][:200])
            if started:  # nothing more can be sent
                raise
            problem = RequestError(500, None, f"internal error: {type(e).__name__} (request {rid}; the server log "
                                   "has the traceback)")
            await error_response(self.state, problem, rid)(scope, receive, send_tagged)
        finally:
            metrics.in_flight -= 1
            metrics.count_request(scope["method"], path, status)

    async def guarded(self, scope, receive, send):
        """The app, after the API key and the body's size are checked."""
        problem = self.unauthorized(scope)
        if problem is None:
            receive, problem = await self.read_body(scope, receive)
        if problem is None:
            return await self.app(scope, receive, send)
        response = error_response(self.state, problem, scope["state"]["request_id"],
                                  {"WWW-Authenticate": "Bearer"} if problem.status == 401 else None)
        await response(scope, receive, send)

    def unauthorized(self, scope) -> RequestError | None:
        key = self.state.options.api_key
        if not key or scope["path"] in PUBLIC_PATHS:
            return None
        given = raw_header(scope, b"x-api-key") or bearer_token(raw_header(scope, b"authorization"))
        if given and hmac.compare_digest(given, key.encode()):
            return None
        return RequestError(401, "Authorization", "missing or wrong API key: send `Authorization: Bearer KEY` or "
                            "`X-API-Key: KEY`")

    async def read_body(self, scope, receive):
        """(a receive that replays the whole body, None) or (receive, a 413) past max_body_bytes."""
        limit = self.state.options.max_body_bytes
        too_large = RequestError(413, "body", f"body: larger than the limit of {limit} bytes (--max_body_bytes)")
        for k, v in scope["headers"]:
            if k.lower() == b"content-length" and v.isdigit() and int(v) > limit:
                return receive, too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return receive, too_large
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed():
            nonlocal replay
            if replay is None:
                return await receive()
            message, replay = replay, None
            return message

        return replayed, None


def refused(state: ServeState, reason: str, message: str) -> RequestError:
    """A 503 for load (queue_full, timeout), counted by reason."""
    state.metrics.rejected[reason] += 1
    return RequestError(503, None, message, kind="overloaded" if reason == "queue_full" else reason)


async def model_logits(state: ServeState, adapter: str, texts: list[str], pairs: list[str] | None = None
                       ) -> np.ndarray:
    """Logits for the texts, or a 503 when the queue is full or they wait past --request_timeout for the model."""
    opts, backlog = state.options, state.backlog
    if not backlog.fits(len(texts)):
        raise refused(state, "queue_full", f"overloaded: {backlog.texts} texts wait for the model, and the queue "
                      f"holds at most {opts.max_queue_texts} (--max_queue_texts); retry shortly")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + opts.request_timeout
    with backlog.hold(len(texts)):
        try:
            # Tokenizers are used from one thread only: Rust tokenizers refuse concurrent calls that change
            # truncation. A wait that runs out there or in the batcher's queue leaves both unrun.
            args = (adapter, texts) if pairs is None else (adapter, texts, pairs)
            rows = await asyncio.wait_for(loop.run_in_executor(state.tokenizer_pool, state.registry.tokenize, *args),
                                          opts.request_timeout)
            return await state.batcher.submit(rows, deadline)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            raise refused(state, "timeout", f"timeout: waited {opts.request_timeout:g} s without a turn on the model "
                          "(--request_timeout); retry shortly") from None


async def unless_client_leaves(state: ServeState, request: Request, work):
    """Await `work` (a request's turn on the model) while watching its connection: a client that hangs up (its own
    timeout, say) cancels it, so its texts leave the queue and the model never computes them."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        state.metrics.abandoned += 1
        raise RequestError(499, None, "the client closed the connection before its answer", kind="client_gone")
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def disconnected(request: Request) -> None:
    """Return once the client has gone (after the body, the server's receive() waits for the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def classify_texts(state: ServeState, payload: ClassifyRequest) -> AnyResponse:
    """The answer of the adapter's task (serve.answers) for the request's texts (and pairs)."""
    registry, opts = state.registry, state.options
    names = list(registry.adapters)
    adapter = payload.adapter if payload.adapter is not None else (names[0] if len(names) == 1 else None)
    if adapter is None:
        raise RequestError(422, "adapter", f"adapter: required when several are served ({', '.join(names)})")
    if adapter not in registry.adapters:
        raise RequestError(422, "adapter", f"adapter: unknown adapter {adapter[:100]!r} (served: {', '.join(names)})")
    served = registry.adapters[adapter]
    check_pairs(payload, adapter, served.text_pair)
    pairs = payload.text_pair
    cut = [len(t) > opts.max_chars or (pairs is not None and len(pairs[i]) > opts.max_chars)
           for i, t in enumerate(payload.texts)]
    texts = [t[:opts.max_chars] for t in payload.texts]
    pairs = None if pairs is None else [t[:opts.max_chars] for t in pairs]
    logits = await model_logits(state, adapter, texts, pairs)
    bad = nonfinite_rows(logits[:, :len(served.labels)])
    if bad.size:  # an argmax of NaN is class 0, and NaN is not JSON: no answer rather than an arbitrary one
        message = (f"adapter {adapter!r} gave non-finite logits (NaN or inf) for {bad.size} of {len(texts)} texts "
                   f"(the first: texts[{bad[0]}]); its weights or its precision are at fault (`budgetune evaluate "
                   "--precision fp32` on its run tells which)")
        # the model's fault, not the client's: no field counted against the request, the text named in `errors`
        raise RequestError(500, None, message, [{"field": f"texts[{bad[0]}]", "message": message}],
                           kind="non_finite_logits")
    state.metrics.texts[adapter] += len(texts)
    return answer(served.task, adapter, served.labels, logits, cut, opts.max_chars, served.thresholds)


def create_app(registry: Registry, options: ServeOptions | None = None, *,
               before_load: Callable[[], None] | None = None) -> FastAPI:
    """The app; models load in the background after startup (/health says when). `before_load` runs first."""
    state = ServeState(registry, options or ServeOptions())
    app = FastAPI(title="budgetune serve", version="1", lifespan=make_lifespan(state, before_load),
                  description="Text classification with budgetune adapters. Send the API key (when the server has "
                  "one) as `Authorization: Bearer KEY` or `X-API-Key: KEY`.")
    app.state.serve = state
    app.add_middleware(Guard, state=state)
    add_error_handlers(app, state)
    add_routes(app, state)
    return app


def make_lifespan(state: ServeState, before_load: Callable[[], None] | None):
    """The app's lifespan: the batcher runs and the models load in the background; on shutdown both stop."""
    registry = state.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        model_pool = ThreadPoolExecutor(1, thread_name_prefix="budgetune-model")
        state.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="budgetune-tokenize")
        opts = state.options
        state.batcher = DynamicBatcher(registry.logits, model_pool, state.metrics,
                                       max_wait_s=opts.batch_wait_ms / 1000, max_tokens=opts.max_batch_tokens,
                                       enabled=opts.dynamic_batching)

        async def load():
            try:
                if before_load is not None:
                    await loop.run_in_executor(None, before_load)
                await loop.run_in_executor(model_pool, registry.load)
                state.ready = True
            except Exception as e:  # /health reports it; under the command the server stops and says why
                state.load_error = e
                if state.on_fatal is not None:
                    state.on_fatal()

        loading = loop.create_task(load())
        async with running(state.batcher):
            yield
        await asyncio.wait([loading])
        model_pool.shutdown(wait=True)
        state.tokenizer_pool.shutdown(wait=True)

    return lifespan


def add_error_handlers(app: FastAPI, state: ServeState) -> None:
    """Every failed request, whoever refuses it, answers with an ErrorResponse (error_response)."""

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, e: RequestError):
        if e.status == 500:  # the server's fault: the operator reads it in the log, with the request's id
            log.error("request %s: answered 500 (%s): %s", request_id_of(request), e.kind, e)
        return error_response(state, e, request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return error_response(state, validation_error(e), request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        return error_response(state, RequestError(e.status_code, None, str(e.detail)), request_id_of(request),
                              e.headers)


def add_routes(app: FastAPI, state: ServeState) -> None:
    """POST /v1/classify, GET /v1/adapters, /health, /metrics and the page."""
    registry = state.registry
    key_doc = [Security(APIKeyHeader(name="X-API-Key", auto_error=False))]  # the docs' Authorize button
    errors = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 500, 503)}

    @app.post("/v1/classify", response_model=AnyResponse, responses=errors, dependencies=key_doc,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": ClassifyRequest.model_json_schema()}}}})
    async def classify(request: Request) -> AnyResponse:
        """Each text's answer from the named adapter, by its task (/v1/adapters says which): single_label, the
        label, its id and the probability of each class; multi_label (`task` multi_label), the set of labels at
        the run's thresholds and the probability of each label; regression (`task` regression), the value of each
        target. A run trained on text pairs needs `text_pair`, one per text."""
        started = time.perf_counter()
        try:
            require_ready(state)
            payload = read_request(await request.body(), request.headers.get("content-type"), state.options.max_texts)
            return await unless_client_leaves(state, request, classify_texts(state, payload))
        finally:  # every answer, refusals and errors included
            state.metrics.latency.observe(time.perf_counter() - started)

    @app.get("/v1/adapters", response_model=AdaptersResponse, responses=errors, dependencies=key_doc)
    async def adapters() -> AdaptersResponse:
        """The served adapters: base model, method, trainable parameters, labels, validation accuracy."""
        require_ready(state)
        return AdaptersResponse(adapters=[AdapterInfo(**d) for d in registry.describe()])

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health():
        """200 once every model is loaded; 503 while loading or after loading failed."""
        status = "ready" if state.ready else ("failed" if state.load_error else "loading")
        body = Health(status=status, ready=state.ready, adapters=len(registry.adapters),
                      precision=registry.precision_line(),
                      message=str(state.load_error) if state.load_error else None)
        return JSONResponse(body.model_dump(), status_code=200 if state.ready else 503)

    @app.get("/metrics", response_class=Response, dependencies=key_doc)
    async def metrics() -> Response:
        """Prometheus text: requests, texts, errors, refusals for load, in-flight requests and queued texts,
        model calls, latency and batch-size histograms."""
        return Response(state.metrics.render(state.backlog.texts), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((resources.files("budgetune") / "resources" / "serve.html").read_text("utf-8"))


def check_options(options: ServeOptions) -> None:
    """Refuse limits no server can keep (named by their command-line flags), before anything loads."""
    for flag in ("max_texts", "max_chars", "max_body_bytes", "max_batch_tokens", "max_queue_texts"):
        if getattr(options, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(options, flag)}")
    if options.max_queue_texts < options.max_texts:
        raise ConfigError(f"--max_queue_texts ({options.max_queue_texts}) must be at least --max_texts "
                          f"({options.max_texts}): one full request has to fit")
    if not options.batch_wait_ms >= 0:
        raise ConfigError(f"--batch_wait_ms must be 0 or more, got {options.batch_wait_ms}")
    if not 0 < options.request_timeout < math.inf:
        raise ConfigError(f"--request_timeout must be more than 0 seconds (and finite), got {options.request_timeout}")


def listen_url(host: str, port: int) -> str:
    """The URL a client opens for a bound address: an IPv6 address goes in brackets (http://[::1]:8000/), a zone
    index's % escaped (http://[fe80::1%25eth0]:8000/)."""
    return f"http://[{host.replace('%', '%25')}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_server(runs: list[str], options: ServeOptions | None = None, *, host: str = "127.0.0.1", port: int = 8000,
               device: str | None = None, log_level: str = "warning", precision: str = "auto") -> None:
    """Serve RUN folders (or NAME=PATH) until SIGTERM or SIGINT, which drain in-flight requests and return.

    The options and every run folder are checked before anything loads; a failed load stops the server and is
    raised.
    """
    import uvicorn

    options = options or ServeOptions()
    check_options(options)
    adapters = parse_runs(runs)  # a missing or incompatible folder stops here, named
    registry = Registry(adapters, device=device, precision=precision)
    app = create_app(registry, options)
    state: ServeState = app.state.serve

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            for server in self.servers:
                for sock in server.sockets:
                    bound_host, bound_port = sock.getsockname()[:2]
                    print(f"budgetune serve: listening on {listen_url(bound_host, bound_port)} ({len(adapters)} adapters "
                          f"loading; /health says when ready; {registry.precision_line()})", flush=True)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                   timeout_graceful_shutdown=60))
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal: answered here, so a
    # drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if state.load_error is not None:
        raise state.load_error
    print("budgetune serve: stopped", file=sys.stderr)
