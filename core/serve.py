"""``embplex serve``: an HTTP server for a composed or saved model, with the request and
response shapes of the two APIs embedding clients are written for.

* OpenAI: ``POST /v1/embeddings`` (``input``, ``model``, ``encoding_format`` float or
  base64, ``dimensions``), errors as ``{"error": {"message", "type", "param", "code"}}``.
* text-embeddings-inference (TEI): ``POST /embed`` (``inputs``, ``truncate``,
  ``normalize``, ``dimensions``) and ``GET /info``, errors as ``{"error", "error_type"}``
  with TEI's status codes (400 empty, 413 validation, 422 tokenizer, 429 overloaded).
* embplex's own: ``POST /search`` (when an index is served), ``GET /health``,
  ``GET /plugins`` and ``GET /metrics`` (the Prometheus text format).

Requests from concurrent clients are batched dynamically: a worker thread owns the model,
waits ``batch_wait_ms`` for more texts after the first arrives, and runs them through
:meth:`~embplex.model.EmbeddingModel.encode` in one call (which sorts by length), then hands
each request its own rows. Texts never interact inside the encoder, so each response equals
what the request would get alone, up to float rounding (well below 1e-6). The queue is
bounded in texts; a request that does not fit gets 429 at once.

fastapi and uvicorn are imported inside the functions that need them (``embplex[serve]``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import hashlib
import hmac
import json
import math
import signal
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from .errors import EmbplexError, InputError, NonFiniteError, OptionError

# -- settings ----------------------------------------------------------------------------


@dataclasses.dataclass
class ServeSettings:
    """How to serve (the ``serve`` section of the config; defaults as in conf/embplex.yaml).

    :param host: the address to bind; 127.0.0.1 keeps the server on this machine.
    :param port: the TCP port; 0 picks a free one (printed at start).
    :param api_key: a token every request but ``/health`` must carry as
        ``Authorization: Bearer <key>``; ``None``: no key.
    :param model_name: the model's name in responses and ``/info``; ``None``: the saved
        folder's name, or the backbone's path.
    :param index: a saved index folder (what ``embplex index`` writes to ``output_dir/index``),
        or a run folder holding one in ``index/``, served by ``POST /search``.
    :param metadata: ``/search`` also returns each hit's title and text from ``data.eval``'s
        corpus, which must be the corpus the index was built from (its SHA-256 is checked).
    :param max_texts: texts per request.
    :param max_chars: characters per text.
    :param max_body_bytes: bytes per request body.
    :param max_k: hits per query ``/search`` may ask for.
    :param truncation: a text over ``max_chars`` characters or over the model's token limit:
        ``error`` (a 4xx naming it) or ``truncate`` (cut it and embed the rest). TEI's
        per-request ``truncate`` overrides it for the token limit, as TEI's does.
    :param dimensions: the widths ``dimensions`` may ask for (Matryoshka truncation,
        renormalised); only a model trained for them gives useful shorter vectors, so none
        is allowed unless listed. The model's full width is always allowed.
    :param batching: collect texts of concurrent requests into one forward pass.
    :param batch_wait_ms: how long the first request of a batch waits for others.
    :param max_batch_texts: texts per forward pass at most (one request is never split).
    :param max_queue_texts: texts waiting at most; a request beyond it gets 429.
    :param batch_size: ``encode``'s batch size inside a forward pass.
    :param graceful_shutdown_s: on SIGTERM or Ctrl-C, how long in-flight requests may take
        to finish before the server stops anyway.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_name: str | None = None
    index: str | None = None
    metadata: bool = False
    max_texts: int = 256
    max_chars: int = 20000
    max_body_bytes: int = 4_000_000
    max_k: int = 100
    truncation: Literal["error", "truncate"] = "truncate"
    dimensions: list[int] = dataclasses.field(default_factory=list)
    batching: bool = True
    batch_wait_ms: float = 5.0
    max_batch_texts: int = 256
    max_queue_texts: int = 4096
    batch_size: int = 64
    graceful_shutdown_s: float = 30.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ServeSettings":
        """Settings from a config section, refusing unknown keys and bad values."""
        accepted = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise OptionError(f"serve has no setting '{key}'.{hint} Settings: {', '.join(accepted)}.")
        settings = cls(**{k: (list(v) if k == "dimensions" else v) for k, v in values.items()})
        settings.check()
        return settings

    def check(self) -> None:
        for name in ("max_texts", "max_chars", "max_body_bytes", "max_k", "max_batch_texts", "max_queue_texts", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"serve.{name} must be a whole number of at least 1, not {value!r}.")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise OptionError(f"serve.port must be between 0 (any free port) and 65535, not {self.port!r}.")
        if self.truncation not in ("error", "truncate"):
            raise OptionError(f"serve.truncation must be 'error' or 'truncate', not {self.truncation!r}.")
        if not isinstance(self.batch_wait_ms, (int, float)) or not 0 <= self.batch_wait_ms <= 10_000:
            raise OptionError(f"serve.batch_wait_ms must be between 0 and 10000, not {self.batch_wait_ms!r}.")
        if self.max_queue_texts < self.max_texts:
            raise OptionError(
                f"serve.max_queue_texts={self.max_queue_texts} is below serve.max_texts={self.max_texts}: "
                "a full-size request could never be queued; raise max_queue_texts."
            )
        for width in self.dimensions:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise OptionError(f"serve.dimensions lists {width!r}; list whole widths of at least 1.")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise OptionError("serve.api_key must be a non-empty text, or null for no key.")


# -- errors ------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the server refuses; the route turns it into its API's error shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind  # empty | validation | tokenizer | overloaded | unauthorized | not_found | ...
        self.param = param


_OPENAI_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "not_found"}


def openai_error(error: RequestError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "invalid_request_error"),
            "param": error.param,
            "code": _OPENAI_CODES.get(error.status, error.kind),
        }
    }


def tei_error(error: RequestError) -> dict[str, Any]:
    return {"error": error.message, "error_type": "validation" if error.kind == "invalid" else error.kind}


def _tei_status(error: RequestError) -> int:
    """TEI's status codes: 400 empty, 413 too large (validation), 422 a body of the wrong
    shape or a tokenizer error, 424 a backend failure, 429 overloaded; others as given."""
    return {"invalid": 422, "tokenizer": 422, "backend": 424}.get(error.kind, error.status)


# -- metrics -----------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum!r}", f"{name}_count{braces} {self.total}"]
        return out


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Counters and histograms, written in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, _Histogram] = {}
        self.batch_texts = _Histogram(_BATCH_BUCKETS)
        self.texts = 0
        self.queued = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, status)] += 1
            self.latency.setdefault(route, _Histogram(_LATENCY_BUCKETS)).observe(seconds)

    def batch(self, texts: int) -> None:
        with self._lock:
            self.batch_texts.observe(texts)
            self.texts += texts

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP embplex_requests_total HTTP requests by route and status.", "# TYPE embplex_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'embplex_requests_total{{route="{route}",status="{status}"}} {count}')
            errors = collections.Counter()
            for (route, status), count in self.requests.items():
                if status >= 400:
                    errors[route] += count
            lines += ["# HELP embplex_request_errors_total Requests answered with a 4xx or 5xx.", "# TYPE embplex_request_errors_total counter"]
            lines += [f'embplex_request_errors_total{{route="{route}"}} {count}' for route, count in sorted(errors.items())]
            lines += ["# HELP embplex_request_seconds Time to answer a request.", "# TYPE embplex_request_seconds histogram"]
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("embplex_request_seconds", f'route="{route}"')
            lines += ["# HELP embplex_batch_texts Texts per forward pass (dynamic batches).", "# TYPE embplex_batch_texts histogram"]
            lines += self.batch_texts.lines("embplex_batch_texts")
            lines += ["# HELP embplex_texts_embedded_total Texts embedded.", "# TYPE embplex_texts_embedded_total counter"]
            lines.append(f"embplex_texts_embedded_total {self.texts}")
            lines += ["# HELP embplex_queue_texts Texts waiting for a forward pass.", "# TYPE embplex_queue_texts gauge"]
            lines.append(f"embplex_queue_texts {self.queued}")
        return "\n".join(lines) + "\n"


# -- dynamic batching --------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    texts: list[str]
    normalize: bool
    truncate: bool
    future: concurrent.futures.Future


@dataclasses.dataclass
class Embedded:
    """One request's vectors (``[texts, dim]``, float32) and its token count."""

    vectors: np.ndarray
    tokens: int


class Batcher:
    """The worker thread that owns the model: it takes requests from a bounded queue and
    embeds the texts of several requests in one :meth:`encode` call.

    :meth:`submit` returns a :class:`concurrent.futures.Future` of :class:`Embedded`, or
    raises :class:`RequestError` (429) when the queue has no room for the texts.
    """

    def __init__(self, model: Any, settings: ServeSettings, metrics: Metrics | None = None) -> None:
        self.model = model
        self.settings = settings
        self.metrics = metrics or Metrics()
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="embplex-batcher", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str], normalize: bool, truncate: bool) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise RequestError(503, "the server is shutting down; retry on another replica.", "unhealthy")
            if self._queued_texts + len(texts) > self.settings.max_queue_texts:
                raise RequestError(
                    429,
                    f"the server is overloaded: {self._queued_texts} texts are waiting "
                    f"(serve.max_queue_texts={self.settings.max_queue_texts}); retry later.",
                    "overloaded",
                )
            self._queue.append(_Job(texts, normalize, truncate, future))
            self._queued_texts += len(texts)
            self.metrics.queued = self._queued_texts
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued requests, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        """The next batch of requests: the first waiting one, plus those arriving within
        ``batch_wait_ms`` while they fit in ``max_batch_texts``."""
        settings = self.settings
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            jobs = [self._queue.popleft()]
            count = len(jobs[0].texts)
            if settings.batching:
                deadline = time.monotonic() + settings.batch_wait_ms / 1000
                while count < settings.max_batch_texts:
                    while self._queue and count + len(self._queue[0].texts) <= settings.max_batch_texts:
                        job = self._queue.popleft()
                        jobs.append(job)
                        count += len(job.texts)
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closing or (self._queue and count + len(self._queue[0].texts) > settings.max_batch_texts):
                        break
                    self._cond.wait(left)
            self._queued_texts -= count
            self.metrics.queued = self._queued_texts
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                self._embed(jobs)
            except BaseException as exc:  # never leave a client waiting: every job gets an answer
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _embed(self, jobs: list[_Job]) -> None:
        model = self.model
        limit = model.backbone.max_length
        ready: list[tuple[_Job, int]] = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue
            # one tokenization per request, in this thread (fast tokenizers are not safe to
            # share between threads): token counts for `usage`, and the per-request check
            # of the token limit, so one request's long text never fails another's batch
            with warnings.catch_warnings():  # transformers: max_length unused without truncation, the point
                warnings.simplefilter("ignore", UserWarning)
                lengths = model.backbone.tokenize(job.texts, truncate=False).attention_mask.sum(dim=1).tolist()
            too_long = [i for i, n in enumerate(lengths) if n > limit]
            if too_long and not job.truncate:
                job.future.set_exception(
                    RequestError(
                        413,
                        f"input {too_long[0]} has {lengths[too_long[0]]} tokens, more than the model's maximum "
                        f"of {limit}"
                        + (f" ({len(too_long)} inputs are too long)" if len(too_long) > 1 else "")
                        + "; shorten it or ask for truncation.",
                        "validation",
                        "input",
                    )
                )
                continue
            ready.append((job, sum(min(n, limit) for n in lengths)))
        for normalize in (True, False):
            group = [(job, tokens) for job, tokens in ready if job.normalize == normalize]
            if not group:
                continue
            texts = [text for job, _ in group for text in job.texts]
            try:
                vectors = model.encode(
                    texts,
                    batch_size=self.settings.batch_size,
                    normalize=normalize,
                    truncation="silent",
                    show_progress=False,
                )
            except Exception as exc:
                error = _backend_error(exc)
                for job, _ in group:
                    job.future.set_exception(error)
                continue
            self.metrics.batch(len(texts))
            start = 0
            for job, tokens in group:
                rows = vectors[start : start + len(job.texts)]
                start += len(job.texts)
                job.future.set_result(Embedded(np.ascontiguousarray(rows, dtype=np.float32), tokens))


def _backend_error(exc: Exception) -> RequestError:
    if isinstance(exc, InputError):
        return RequestError(422, str(exc), "tokenizer", "input")
    if isinstance(exc, NonFiniteError):
        return RequestError(500, str(exc), "backend")
    # a fault of the model, not of the request: a message, never a traceback
    return RequestError(500, f"the model failed to embed the batch ({type(exc).__name__}).", "backend")


# -- request parsing ---------------------------------------------------------------------


def _texts(value: Any, name: str, settings: ServeSettings, allow_truncate: bool) -> list[str]:
    """The texts of ``input``/``inputs``: a string or a list of strings, within the limits."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list):
        texts = value
    else:
        raise RequestError(400, f"'{name}' must be a string or a list of strings.", "invalid", name)
    if not texts:
        raise RequestError(400, f"'{name}' is empty: send at least one text.", "empty", name)
    if len(texts) > settings.max_texts:
        raise RequestError(
            413,
            f"batch size {len(texts)} > maximum allowed batch size {settings.max_texts} (serve.max_texts); "
            "split the request.",
            "validation",
            name,
        )
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            what = "token ids" if isinstance(text, (int, list)) else type(text).__name__
            raise RequestError(400, f"'{name}'[{i}] is {what}, not a string; send text.", "invalid", name)
        if not text.strip():
            raise RequestError(400, f"'{name}'[{i}] is empty; every text needs some content.", "empty", name)
        if len(text) > settings.max_chars:
            if not allow_truncate:
                raise RequestError(
                    413,
                    f"'{name}'[{i}] has {len(text)} characters, more than the maximum of {settings.max_chars} "
                    "(serve.max_chars); shorten it.",
                    "validation",
                    name,
                )
            text = text[: settings.max_chars]
        out.append(text)
    return out


def _dimensions(value: Any, model_dim: int, settings: ServeSettings) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, "'dimensions' must be a whole number.", "validation", "dimensions")
    if value == model_dim:
        return None
    if value > model_dim or value < 1:
        raise RequestError(
            400,
            f"'dimensions'={value} is not possible: the model's embeddings have {model_dim} dimensions.",
            "validation",
            "dimensions",
        )
    if value not in settings.dimensions:
        allowed = sorted({*settings.dimensions, model_dim})
        raise RequestError(
            400,
            f"'dimensions'={value} is not served for this model; allowed: {allowed} "
            "(serve.dimensions lists the widths a Matryoshka-trained model supports).",
            "validation",
            "dimensions",
        )
    return value


def truncate_vectors(vectors: np.ndarray, dim: int | None, normalize: bool) -> np.ndarray:
    """The first ``dim`` dimensions (Matryoshka), renormalised when the vectors are."""
    if dim is None:
        return vectors
    cut = vectors[:, :dim]
    if normalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(cut, dtype=np.float32)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false.", "invalid", key)
    return value


# -- the application ---------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    """What a server serves: the model, its name, and optionally an index."""

    model: Any
    name: str
    index: Any = None
    documents: dict[str, dict[str, str]] | None = None
    index_name: str | None = None


def create_app(
    model: Any,
    settings: ServeSettings | None = None,
    *,
    name: str | None = None,
    index: Any = None,
    documents: Mapping[str, Mapping[str, str]] | None = None,
    index_name: str | None = None,
) -> Any:
    """The FastAPI application serving ``model`` (and ``index`` on ``/search``).

    :param documents: id -> ``{"title", "text"}`` returned as each hit's metadata.
    """
    require("fastapi", "serve")
    import fastapi
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    settings.check()
    _check_single_vector(model)
    served = Served(model, name or served_name(model), index, dict(documents) if documents else None, index_name)
    metrics = Metrics()
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["batcher"] = Batcher(model, settings, metrics)
        try:
            yield
        finally:
            # uvicorn has finished the in-flight requests by now; finish what is queued
            await asyncio.get_running_loop().run_in_executor(None, state["batcher"].close)

    app = fastapi.FastAPI(title="embplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # the key's digest: comparing digests takes the same time whatever the key's length
    key = hashlib.sha256(settings.api_key.encode("utf-8")).digest() if settings.api_key else None

    def respond(request: Any, error: RequestError) -> Any:
        if _is_openai(request.url.path):
            return JSONResponse(openai_error(error), status_code=error.status)
        return JSONResponse(tei_error(error), status_code=_tei_status(error))

    @app.middleware("http")
    async def guard(request: Any, call_next: Any) -> Any:
        started = time.perf_counter()
        route = _route_label(request.url.path)
        try:
            if key is not None and request.url.path != "/health":
                given = request.headers.get("authorization", "")
                scheme, _, token = given.partition(" ")
                # compare_digest takes the same time wherever the bytes differ
                digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
                if not hmac.compare_digest(digest, key) or scheme.lower() != "bearer":
                    raise RequestError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'.", "unauthorized")
            if request.method == "POST":
                declared = request.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
                    raise _too_large(int(declared), settings)
            response = await call_next(request)
        except RequestError as error:
            response = respond(request, error)
        except Exception:  # a bug: a JSON error, never a traceback to the client
            response = respond(request, RequestError(500, "internal error while answering the request.", "backend"))
        metrics.request(route, response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(RequestError)
    async def on_request_error(request: Any, error: RequestError) -> Any:
        return respond(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Any, exc: Any) -> Any:
        if exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}."
        elif exc.status_code == 404:
            message = f"no route {request.url.path}; routes: {', '.join(ROUTES)}."
        else:
            message = str(exc.detail)
        return respond(request, RequestError(exc.status_code, message, "not_found" if exc.status_code == 404 else "validation"))

    @app.exception_handler(Exception)
    async def on_bug(request: Any, exc: Exception) -> Any:
        return respond(request, RequestError(500, "internal error while answering the request.", "backend"))

    def route(method: str, path: str) -> Any:
        # plain Starlette routes: the handlers read and check the JSON themselves, so every
        # error has its API's shape (FastAPI's own validation answers in a third one)
        def add(handler: Any) -> Any:
            app.add_route(path, handler, methods=[method])
            return handler

        return add

    async def read_json(request: Any) -> dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise _too_large(size, settings)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc}).", "validation") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object.", "validation")
        return body

    async def embed(texts: list[str], normalize: bool, truncate: bool) -> Embedded:
        future = state["batcher"].submit(texts, normalize, truncate)
        return await asyncio.wrap_future(future)

    @route("POST", "/v1/embeddings")
    async def openai_embeddings(request: Any) -> Any:
        body = await read_json(request)
        truncate = settings.truncation == "truncate"
        texts = _texts(body.get("input"), "input", settings, truncate)
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise RequestError(400, f"'encoding_format' must be 'float' or 'base64', not {fmt!r}.", "validation", "encoding_format")
        dim = _dimensions(body.get("dimensions"), model.dim, settings)
        result = await embed(texts, bool(model.normalize), truncate)
        vectors = truncate_vectors(result.vectors, dim, bool(model.normalize))
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(vector, fmt)}
            for i, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": result.tokens, "total_tokens": result.tokens}
        return JSONResponse({"object": "list", "data": data, "model": served.name, "usage": usage})

    @route("POST", "/embed")
    async def tei_embed(request: Any) -> Any:
        body = await read_json(request)
        truncate = _bool(body, "truncate", settings.truncation == "truncate")
        texts = _texts(body.get("inputs"), "inputs", settings, settings.truncation == "truncate")
        normalize = _bool(body, "normalize", True)
        dim = _dimensions(body.get("dimensions"), model.dim, settings)
        result = await embed(texts, normalize, truncate)
        vectors = truncate_vectors(result.vectors, dim, normalize)
        return JSONResponse(vectors.tolist())

    @route("POST", "/search")
    async def search(request: Any) -> Any:
        if served.index is None:
            raise RequestError(
                400,
                "this server has no index: start it with serve.index=<folder built by `embplex index`>.",
                "validation",
            )
        body = await read_json(request)
        queries = body.get("query", body.get("queries"))
        texts = _texts(queries, "query", settings, settings.truncation == "truncate")
        k = body.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= settings.max_k:
            raise RequestError(400, f"'k' must be a whole number from 1 to {settings.max_k} (serve.max_k).", "validation", "k")
        result = await embed(texts, bool(model.normalize), settings.truncation == "truncate")
        hits = await asyncio.get_running_loop().run_in_executor(None, served.index.search, result.vectors, k)
        out = []
        for q, (ids, scores) in enumerate(zip(hits.ids, hits.scores)):
            rows = []
            for doc_id, score in zip(ids, np.asarray(scores).tolist()):
                row: dict[str, Any] = {"id": doc_id, "score": score}
                if served.documents is not None:
                    row["metadata"] = served.documents.get(doc_id, {})
                rows.append(row)
            out.append({"query": q, "hits": rows})
        return JSONResponse({"results": out, "model": served.name, "usage": {"prompt_tokens": result.tokens}})

    @route("GET", "/health")
    async def health(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    @route("GET", "/plugins")
    async def plugins(request: Any) -> Any:
        from importlib.metadata import PackageNotFoundError, version

        try:
            embplex_version = version("embplex")
        except PackageNotFoundError:  # running from a source tree
            embplex_version = None
        components = {
            kind: {k: spec.get(k) for k in ("name", "options", "plugin", "distribution", "version")}
            for kind, spec in (model.specs or {}).items()
        }
        return JSONResponse(
            {
                "model": served.name,
                "embplex": embplex_version,
                "components": components,
                "normalize": bool(model.normalize),
                "dim": model.dim,
                "index": None if served.index is None else {"name": served.index_name, "size": len(served.index)},
            }
        )

    @route("GET", "/info")
    async def info(request: Any) -> Any:
        pooling = ((model.specs or {}).get("pooling") or {}).get("name")
        return JSONResponse(
            {
                "model_id": served.name,
                "model_sha": None,
                "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "model_type": {"embedding": {"pooling": pooling}},
                "max_concurrent_requests": settings.max_queue_texts,
                "max_input_length": model.backbone.max_length,
                "max_batch_tokens": settings.batch_size * model.backbone.max_length,
                "max_batch_requests": None,
                "max_client_batch_size": settings.max_texts,
                "auto_truncate": settings.truncation == "truncate",
                "tokenization_workers": 1,
                "version": "embplex",
                "dimensions": model.dim,
            }
        )

    @route("GET", "/metrics")
    async def prometheus(request: Any) -> Any:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.state.metrics = metrics
    return app


ROUTES = ("POST /v1/embeddings", "POST /embed", "POST /search", "GET /info", "GET /health", "GET /plugins", "GET /metrics")
_KNOWN_PATHS = {route.split(" ", 1)[1] for route in ROUTES}


def _route_label(path: str) -> str:
    return path if path in _KNOWN_PATHS else "other"


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _too_large(size: int, settings: ServeSettings) -> RequestError:
    return RequestError(
        413,
        f"the request body has {size} bytes, more than the maximum of {settings.max_body_bytes} "
        "(serve.max_body_bytes); split the request.",
        "validation",
    )


def _encode_vector(vector: np.ndarray, fmt: str) -> Any:
    if fmt == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


def _check_single_vector(model: Any) -> None:
    probe = model.encode(["probe"], show_progress=False)
    if isinstance(probe, list) or getattr(probe, "ndim", 2) != 2:
        raise OptionError(
            "embplex serve answers one vector per text; this model's pooling returns a set of vectors "
            "per text (late interaction). Serve a single-vector pooling (e.g. pooling=mean)."
        )
    if not np.isfinite(probe).all():
        raise NonFiniteError("the model gives non-finite embeddings; it cannot be served.")


def served_name(model: Any) -> str:
    """The name a model is served and reported under: its saved folder's, else its backbone path's."""
    if getattr(model, "source", None):
        return Path(model.source).name
    options = ((model.specs or {}).get("backbone") or {}).get("options") or {}
    path = options.get("path")
    return Path(str(path)).name if path else "embplex"


# -- running it --------------------------------------------------------------------------


def require(module: str, extra: str) -> None:
    """Refuse, with the install command, when an optional library is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise EmbplexError(f"this needs {module}, which is not installed: pip install 'embplex[{extra}]'.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a clear error when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OptionError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another serve.port "
            "(0 picks a free one) or serve.host."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, settings: ServeSettings) -> Any:
    require("uvicorn", "serve")
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(math.ceil(settings.graceful_shutdown_s)),
        lifespan="on",
    )
    return uvicorn.Server(config)


@contextlib.contextmanager
def serve_in_thread(app: Any, settings: ServeSettings | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` on a free loopback port in a background thread; yields its base URL and
    shuts it down (in-flight requests finished) on exit. For tests and benchmarks."""
    settings = settings or ServeSettings()
    sock = bind(host, 0)
    server = make_server(app, settings)
    # uvicorn installs signal handlers only in the main thread: this one leaves them alone
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(settings.graceful_shutdown_s + 30)
        sock.close()


def run_serve(cfg: dict[str, Any], registry: Any) -> dict[str, Any]:
    """``embplex serve``: build or load the model, load the index, serve until SIGTERM or
    Ctrl-C, finishing the requests in flight."""
    from .app import build_model

    settings = ServeSettings.from_dict(cfg["serve"])
    model = build_model(cfg, registry)
    index, documents, index_name = load_served_index(cfg, registry, model, settings)
    app = create_app(model, settings, name=settings.model_name, index=index, documents=documents, index_name=index_name)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    extra = f"; index {index_name} with {len(index)} items on /search" if index is not None else ""
    print(f"serving {served_name(model) if settings.model_name is None else settings.model_name} on http://{shown}:{port}{extra}", flush=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print("warning: serving beyond this machine without serve.api_key: anyone who reaches it can use it", flush=True)
    server = make_server(app, settings)
    # uvicorn shuts down gracefully on SIGTERM, then sends the signal again to whatever
    # handler was there before it; this one lets the command end normally (exit 0)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("server stopped: every request in flight was answered", flush=True)
    return {}


def load_served_index(
    cfg: dict[str, Any], registry: Any, model: Any, settings: ServeSettings
) -> tuple[Any, dict[str, dict[str, str]] | None, str | None]:
    """The index ``serve.index`` names, checked against the served model (an index built by
    another model would answer with wrong neighbours), and its documents when
    ``serve.metadata`` asks for them."""
    if not settings.index:
        if settings.metadata:
            raise OptionError("serve.metadata=true needs an index: set serve.index=<folder built by `embplex index`>.")
        return None, None, None
    from . import storage
    from .app import load_index, model_fingerprint

    root = Path(settings.index).expanduser()
    if not (root / "manifest.json").exists() and (root / "index" / "manifest.json").exists():
        root = root / "index"
    index = load_index(root, registry, dim=model.dim)
    name = storage.read_index_manifest(root)["index"]
    built_from = index.built_from or {}
    if built_from.get("model") and built_from["model"] != model_fingerprint(model):
        raise OptionError(
            f"serve.index={root} was built with another model than the one served: its vectors and the "
            "queries' would not be comparable. Serve the model it was built with (model.load=...), or "
            "build the index again with this one (`embplex index`)."
        )
    documents = None
    if settings.metadata:
        spec = (cfg.get("data") or {}).get("eval") or {}
        if spec.get("task") != "retrieval":
            raise OptionError("serve.metadata=true reads the corpus of data.eval: choose a retrieval data set (data=scifact).")
        corpus_file = Path(spec["path"]).expanduser() / "corpus.jsonl"
        if built_from.get("corpus") != storage.sha256_file(corpus_file):
            raise OptionError(
                f"serve.metadata=true: {corpus_file} is not the corpus serve.index={root} was built from; "
                "choose its data set, or serve.metadata=false."
            )
        documents = _documents(corpus_file)
    return index, documents, name


def _documents(corpus_file: Path) -> dict[str, dict[str, str]]:
    documents: dict[str, dict[str, str]] = {}
    with open(corpus_file, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                documents[str(row["_id"])] = {"title": row.get("title", ""), "text": row.get("text", "")}
    return documents


__all__ = ["Batcher", "Metrics", "ServeSettings", "create_app", "run_serve", "serve_in_thread", "truncate_vectors"]
