"""The HTTP service (FastAPI): ``create_app(service, serve_cfg)``.

Endpoints::

    GET  /            an HTML page to try the recommender (static, calls /users and /recommend)
    POST /recommend   {"user_id": "U1"} or {"history": ["N1", ...]}, optional "k", "ignore_unknown"
                      → {"items": [{"news_id", "score", "retrieval_score", "title", "category",
                         "fresh"}, ...], "history": [{"news_id", "title", "category"}, ...],
                         "history_used", "ignored_ids", "reranked", "took_ms"}
                      ("history": the clicks fed to the user encoder, oldest first)
    GET  /users       ?limit=50 (1..1000) → {"user_ids": [...], "total"}: sample user ids of the dataset
    POST /news        {"news_id", "title", "category"?, "subcategory"?} → 201, the news is retrievable
                      (beyond ``serve.max_fresh_news`` fresh news the oldest are evicted)
    POST /index/save  persist fresh news into INDEX_DIR (atomic); also done at shutdown
    GET  /health      {"status": "ok", news count, index kind, uptime, counters}
    GET  /metrics     Prometheus text format: requests by route and status, latency histograms,
                      index size, fresh news, micro-batch sizes (a registry of this app only)
    GET  /metrics.json  counters: requests, 4xx, 5xx per endpoint; latency p50/p95/p99 (ms)

Writes (POST /news, POST /index/save) need ``Authorization: Bearer <token>`` when an admin token
is set (``serve.admin_token`` or $NEWSREC_ADMIN_TOKEN): 401 without one, 403 for a wrong one
(compared in constant time). ``check_open_writes`` refuses to serve writes without a token on a
host other than loopback.

Bad input never reaches the model: malformed JSON → 400; missing/extra fields, wrong types, k or
limit out of range, a history longer than ``serve.max_history`` → 422; unknown user → 404; unknown
history ids → 422 naming them (or dropped with ``"ignore_unknown": true`` /
``serve.ignore_unknown_history``); a body larger than ``serve.max_body_bytes`` → 413; a duplicate
fresh news id → 409. Every error answers ``{"detail": "<one line>"}``; an unexpected failure answers
500 and the service keeps serving.
"""
# No `from __future__ import annotations`: FastAPI must see the request models built in create_app.

import contextlib
import hmac
import importlib.resources
import ipaddress
import logging
import os
import threading
import time
from collections import deque
from typing import Any, AsyncIterator

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from newsrec.config import ServeConfig
from newsrec.errors import ConfigError, NewsrecError
from newsrec.serve.service import DuplicateNewsError, Recommender, UnknownNewsError, UnknownUserError

log = logging.getLogger("newsrec.serve")
MAX_ID_CHARS = 128
MAX_SAMPLE_USERS = 1000
TOKEN_ENV = "NEWSREC_ADMIN_TOKEN"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


# ---------------------------------------------------------------------------- write protection
def admin_token(cfg: ServeConfig) -> str:
    """The token write endpoints require: ``serve.admin_token``, else $NEWSREC_ADMIN_TOKEN, else ""
    (writes open)."""
    return cfg.admin_token or os.environ.get(TOKEN_ENV, "")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_open_writes(cfg: ServeConfig, host: str) -> None:
    """ConfigError when serving on a non-loopback ``host`` with write endpoints open to anyone."""
    if not admin_token(cfg) and not is_loopback(host) and not cfg.allow_open_writes:
        raise ConfigError(f"serving on {host} without an admin token would let anyone add news and "
                          f"overwrite the index; set {TOKEN_ENV} (or serve.admin_token), or pass "
                          f"--allow-open-writes")


def _write_guard(token: str) -> Any:
    """A FastAPI dependency: the bearer token check of the write endpoints (none when ``token`` is "")."""
    expected = token.encode("utf-8")

    async def require_token(request: Request) -> None:
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise StarletteHTTPException(401, "this endpoint needs 'Authorization: Bearer <admin token>'",
                                         headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8"), expected):
            raise StarletteHTTPException(403, "wrong admin token")

    return require_token


# ---------------------------------------------------------------------------- request / response
def _request_models(cfg: ServeConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """Request models whose limits (k, history length, title length) come from ``cfg``, so the
    OpenAPI schema states them."""

    class RecommendRequest(BaseModel):
        """Exactly one of ``user_id`` (latest history in the dataset) or ``history`` (news ids,
        oldest first)."""

        model_config = ConfigDict(extra="forbid")
        user_id: StrictStr | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
        history: list[StrictStr] | None = Field(None, max_length=cfg.max_history)
        k: StrictInt = Field(cfg.default_k, ge=1, le=cfg.max_k)
        ignore_unknown: StrictBool | None = None

        @model_validator(mode="after")
        def _one_source(self) -> "RecommendRequest":
            if (self.user_id is None) == (self.history is None):
                raise ValueError("give exactly one of user_id or history")
            return self

    class NewsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        news_id: StrictStr = Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")
        title: StrictStr = Field(min_length=1, max_length=cfg.max_title_chars)
        category: StrictStr | None = Field(None, max_length=MAX_ID_CHARS)
        subcategory: StrictStr | None = Field(None, max_length=MAX_ID_CHARS)

    return RecommendRequest, NewsRequest


class ItemOut(BaseModel):
    news_id: str
    score: float
    retrieval_score: float
    title: str
    category: str
    fresh: bool


class NewsOut(BaseModel):
    news_id: str
    title: str
    category: str


class RecommendResponse(BaseModel):
    items: list[ItemOut]
    history: list[NewsOut]
    history_used: int
    ignored_ids: list[str]
    reranked: bool
    took_ms: float


class NewsResponse(BaseModel):
    news_id: str
    news_count: int


class UsersResponse(BaseModel):
    user_ids: list[str]
    total: int


# ---------------------------------------------------------------------------- counters
class ServiceMetrics:
    """Request counters and latency percentiles over the last ``window`` requests per endpoint."""

    def __init__(self, window: int) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.started = time.time()
        self.counts: dict[str, dict[str, int]] = {}
        self.latencies: dict[str, deque[float]] = {}

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        klass = f"{status // 100}xx"
        with self._lock:
            c = self.counts.setdefault(endpoint, {"requests": 0, "2xx": 0, "4xx": 0, "5xx": 0})
            c["requests"] += 1
            c[klass] = c.get(klass, 0) + 1
            self.latencies.setdefault(endpoint, deque(maxlen=self._window)).append(seconds * 1e3)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            endpoints = {}
            for name, c in self.counts.items():
                lat = np.asarray(self.latencies.get(name, ()), dtype=np.float64)
                pct = ({f"p{p}_ms": round(float(np.percentile(lat, p)), 3) for p in (50, 95, 99)}
                       if len(lat) else {})
                endpoints[name] = {**c, **pct}
            totals = {key: sum(c.get(key, 0) for c in self.counts.values())
                      for key in ("requests", "2xx", "4xx", "5xx")}
        return {"uptime_s": round(time.time() - self.started, 1), "requests": totals["requests"],
                "errors_4xx": totals["4xx"], "errors_5xx": totals["5xx"], "endpoints": endpoints}


class PrometheusMetrics:
    """The app's Prometheus metrics, in a registry of its own (several apps may live in one
    process): requests by route, method and status, latency histograms by route, index size,
    fresh news, micro-batch sizes."""

    def __init__(self, service: Recommender) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("newsrec_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("newsrec_request_duration_seconds", "Time to answer a request",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("newsrec_batch_size", "Requests per batched model call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        Gauge("newsrec_index_news", "News the index searches", registry=self.registry
              ).set_function(lambda: service.index.count)
        Gauge("newsrec_fresh_news", "Fresh news added through POST /news and kept", registry=self.registry
              ).set_function(lambda: service.stats()["fresh_news"])
        self.registry.register(_EvictedCollector(service))

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EvictedCollector:
    """``newsrec_fresh_news_evicted_total``: a counter owned by the service."""

    def __init__(self, service: Recommender) -> None:
        self._service = service

    def describe(self) -> list:
        return []

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("newsrec_fresh_news_evicted",
                                  "Fresh news evicted to stay within serve.max_fresh_news",
                                  value=self._service.evicted)


# ---------------------------------------------------------------------------- body size limit
class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes`` — by Content-Length up front, or while streaming when the
    client sends none (chunked), so an oversized body is never held in memory."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_json(send, 400, "Content-Length is not a number")
                return
            if int(length) > self.max_bytes:
                await _send_json(send, 413, f"request body of {int(length)} bytes exceeds "
                                            f"serve.max_body_bytes={self.max_bytes}")
                return
        received = 0
        started = False
        answered = False  # our 413 went out; the app's own answer is then dropped

        async def limited_receive() -> dict:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started:
                        await _send_json(send, 413, f"request body exceeds serve.max_body_bytes={self.max_bytes}")
                        answered = True
                    return {"type": "http.disconnect"}  # the app stops reading, never sees the rest
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


class RequestCounter:
    """Counts every request by route, status and latency into ``metrics`` (plain ASGI: no task
    group or body streams per request). Paths that match no route count as "unmatched"."""

    def __init__(self, app: Any, *, metrics: "ServiceMetrics", prometheus: PrometheusMetrics,
                 known_paths: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.prometheus = prometheus
        self.known_paths = known_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def status_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            route = scope.get("route")  # set by the router once a route matched
            path = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.known_paths else "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.record(f"{scope['method']} {path}", status, seconds)
            self.prometheus.record(scope["method"], path, status, seconds)


async def _send_json(send: Any, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """(status, one line) for a request validation failure: 400 for unparsable JSON, else 422."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        ctx = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {})
        return 400, f"request body is not valid JSON ({ctx.get('error', 'parse error')})"
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(parts) + more


# ---------------------------------------------------------------------------- the app
def page_html() -> str:
    """The page answered at ``GET /``: package data ``newsrec/serve/static/index.html`` (see setup.py)."""
    static = importlib.resources.files("newsrec.serve").joinpath("static")
    return static.joinpath("index.html").read_text(encoding="utf-8")


def create_app(service: Recommender, serve_cfg: ServeConfig | None = None, *,
               save_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI app over ``service``. Limits come from ``serve_cfg`` (default: the service's)."""
    cfg = serve_cfg or service.serve_cfg
    RecommendRequest, NewsRequest = _request_models(cfg)
    page = page_html()
    metrics = ServiceMetrics(cfg.latency_window)
    prometheus = PrometheusMetrics(service)
    service.on_batch = prometheus.batch_size.observe
    writes = [Depends(_write_guard(admin_token(cfg)))]
    known_paths: set[str] = set()  # filled once the routes exist; unknown paths count as "unmatched"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # users' latest rows are read once here, before requests (served on the event loop) need them
        log.info("serving %d users, %d news", service.n_users, service.index.count)
        yield
        if save_on_shutdown and service.dirty and service.index_dir is not None:
            service.save()
            log.info("saved fresh news into %s", service.index_dir)

    app = FastAPI(title="newsrec", version="1", lifespan=lifespan,
                  description="Fastformer news recommendation: FAISS retrieval, re-ranking, fresh news.")
    app.state.service = service
    app.state.metrics = metrics

    # inner to the counters below, so refused bodies (413) are counted too
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)

    app.add_middleware(RequestCounter, metrics=metrics, prometheus=prometheus, known_paths=known_paths)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(exc)
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def _error(status: int, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.post("/recommend", response_model=RecommendResponse,
              responses={400: {}, 404: {}, 413: {}, 422: {}})
    async def recommend(body: RecommendRequest) -> Any:  # type: ignore[valid-type]
        """Top k news for a user of the dataset or for a given history (clicked news excluded)."""
        started = time.perf_counter()
        try:  # checks and ids on the event loop (fast); the model work off it, batched
            rec = await service.recommend_async(user_id=body.user_id, history=body.history, k=body.k,
                                                ignore_unknown=body.ignore_unknown)
        except UnknownUserError as exc:
            return _error(404, exc)
        except (UnknownNewsError, NewsrecError) as exc:
            return _error(422, exc)
        answer = RecommendResponse(
            items=[ItemOut(**vars(item)) for item in rec.items],
            history=[NewsOut(**vars(news)) for news in rec.history], history_used=rec.history_used,
            ignored_ids=rec.ignored_ids, reranked=rec.reranked,
            took_ms=round(1e3 * (time.perf_counter() - started), 3))
        # built and checked once above; a Response is sent as is (not validated a second time)
        return Response(content=answer.model_dump_json(), media_type="application/json")

    @app.post("/news", response_model=NewsResponse, status_code=201, dependencies=writes,
              responses={401: {}, 403: {}, 409: {}, 413: {}, 422: {}})
    def add_news(body: NewsRequest) -> Any:  # type: ignore[valid-type]
        """Add a fresh news: tokenised with the dataset vocabulary, encoded, added to the index."""
        try:
            service.add_news(body.news_id, body.title, category=body.category, subcategory=body.subcategory)
        except DuplicateNewsError as exc:
            return _error(409, exc)
        except NewsrecError as exc:
            return _error(422, exc)
        return NewsResponse(news_id=body.news_id.strip(), news_count=service.index.count)

    @app.post("/index/save", dependencies=writes, responses={401: {}, 403: {}, 409: {}})
    def save_index() -> dict[str, Any]:
        """Write the index with its fresh news back to INDEX_DIR (atomic)."""
        try:
            path = service.save()
        except NewsrecError as exc:
            return _error(409, exc)
        return {"saved": str(path.name), "news_count": service.index.count}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_to_try() -> HTMLResponse:
        """The HTML page: pick a user or paste a history, see the history and the recommendations."""
        return HTMLResponse(page)

    @app.get("/users", response_model=UsersResponse, responses={422: {}})
    def sample_users(limit: int = Query(50, ge=1, le=MAX_SAMPLE_USERS)) -> Any:
        """Up to ``limit`` user ids of the dataset (by latest impression) and how many users it has."""
        return UsersResponse(user_ids=service.sample_user_ids(limit), total=service.n_users)

    @app.get("/health")
    def health() -> dict[str, Any]:
        snap = metrics.snapshot()
        return {"status": "ok", **service.stats(), "uptime_s": snap["uptime_s"],
                "requests": snap["requests"], "errors_5xx": snap["errors_5xx"]}

    @app.get("/metrics", response_class=Response)
    def get_metrics() -> Response:
        """Prometheus text exposition format."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(content=prometheus.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics.json")
    def get_metrics_json() -> dict[str, Any]:
        """Counters and latency percentiles per endpoint, as JSON."""
        return metrics.snapshot()

    known_paths.update(getattr(route, "path", "") for route in app.routes)
    return app
