"""The gateway's HTTP application: OpenAI's routes on FastAPI, errors in OpenAI's shape, metrics.

Routes: ``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST
/v1/chat/completions`` and ``POST /v1/completions`` (streamed or not),
``GET /v1/{chat/completions,completions}/{id}`` (a finished completion) and
``.../{id}/stream`` (resume with ``Last-Event-ID``), ``GET /v1/ws`` (many
requests over one WebSocket: :mod:`producer.gateway.websocket`), and the
Batch API (``/v1/files``, ``/v1/batches``: :mod:`producer.gateway.files`,
:mod:`producer.gateway.batch_routes`, run by a
:class:`~producer.gateway.batch_keeper.BatchKeeper` in every replica).
Bodies are read by the gateway itself, bounded by
``TPQ_HTTP_MAX_BODY_BYTES`` (413 beyond), and checked by
:mod:`producer.gateway.params`: every refusal is a 400 in OpenAI's error
shape, never FastAPI's 422. API keys and their rate limits guard every
``/v1`` route (:mod:`producer.gateway.auth`,
:mod:`producer.gateway.ratelimit`). The app keeps no request state:
:class:`~producer.gateway.completions.Completions` keeps it all in Redis.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route, compile_path

from common.errors import TpqError
from common.metrics import GATEWAY_REGISTRY, HTTP_LATENCY, HTTP_REQUESTS
from common.settings import Settings, get_settings
from producer.async_client import AsyncClient
from producer.gateway import auth, batch_routes, files, openapi, ratelimit, websocket
from producer.gateway.batch_keeper import BatchKeeper
from producer.gateway.completions import Completions
from producer.gateway.errors import APIError, bad_request, from_tpq_error
from producer.gateway.params import Kind, parse_chat, parse_completion
from producer.gateway.streaming import CompletionStream

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KIND_OF_PATH: dict[str, Kind] = {"chat/completions": "chat", "completions": "text"}


class RouteTemplates:
    """The app's HTTP path templates, to name the route of a request that no route has taken yet.

    A response of a middleware (the key check's 401, a rate limit's 429)
    comes before routing: its route is found here as the router finds it
    (a template of that method, else one of another), so a metrics label is
    always one of the app's own templates, never a path a client made up.
    """

    def __init__(self, routes: list[Any]) -> None:
        self.routes = [(compile_path(r.path)[0], r.path, r.methods or set()) for r in routes if isinstance(r, Route)]

    def of(self, scope: dict) -> str:
        """The template of the route that serves (or would serve) ``scope``; ``"unmatched"`` if none would."""
        route = scope.get("route")
        if route is not None:
            return getattr(route, "path", "unmatched")
        path, method = scope.get("path", ""), scope.get("method", "")
        found = [(template, methods) for regex, template, methods in self.routes if regex.fullmatch(path)]
        return next((t for t, methods in found if method in methods), found[0][0] if found else "unmatched")


class _Metrics:
    """ASGI middleware: requests by route template and status, and seconds to the response's start."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                templates = getattr(scope["app"].state, "route_templates", None)
                route = templates.of(scope) if templates is not None else "unmatched"
                HTTP_REQUESTS.labels(route, str(message["status"])).inc()
                HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, counting_send)


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, read up to ``limit`` bytes: 413 past it, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; at most {limit} are accepted "
                         "(TPQ_HTTP_MAX_BODY_BYTES)", code="request_too_large")


def _sse(stream: CompletionStream) -> StreamingResponse:
    return StreamingResponse(stream.events(), media_type="text/event-stream", headers=SSE_HEADERS)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(TpqError)
    async def tpq_error(_request: Request, error: TpqError) -> JSONResponse:
        return await api_error(_request, from_tpq_error(error))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return await api_error(_request, bad_request(f"invalid request: {error.errors()}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        status = error.status_code
        return await api_error(_request, APIError(status, str(error.detail), code=None,
                                                  type_="not_found_error" if status == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception) -> JSONResponse:
        log.exception("gateway: unexpected error")
        return await api_error(_request, APIError(500, f"internal error ({type(error).__name__})"))


def create_app(settings: Settings | None = None, redis_url: str | None = None) -> FastAPI:
    """The gateway app on the Redis at ``redis_url`` (default: ``settings.redis_url``, ``TPQ_REDIS_URL``)."""
    settings = settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = AsyncClient(redis_url, settings, name="tpq-gateway")
        app.state.completions = Completions(client, client.sync_redis, settings)
        app.state.batch_keeper = BatchKeeper(client, settings, app.state.completions)
        app.state.batch_keeper.start()
        try:
            yield
        finally:
            await app.state.batch_keeper.aclose()
            await app.state.completions.aclose()

    app = FastAPI(title="tpqueue gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    openapi.install(app)
    auth.install(app, settings)  # API keys and rate limits on /v1 (inside _Metrics: 401/429 counted)
    app.add_middleware(_Metrics)
    _install_error_handlers(app)
    websocket.install(app, settings)  # GET /v1/ws: many requests over one socket
    batch_api = [files.router(settings), batch_routes.router(settings, read_json)]  # /v1/files, /v1/batches
    for routes in batch_api:
        app.include_router(routes)

    def completions_of(request: Request) -> Completions:
        return request.app.state.completions

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        deployment = await completions_of(request).deployment()
        groups = {name: verdict.health.value for name, (_, verdict) in deployment.groups.items()}
        reason = deployment.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, code="no_live_group")
        return JSONResponse({"status": "ok", "groups": groups})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus_client.generate_latest(GATEWAY_REGISTRY),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        served = (await completions_of(request).deployment()).models
        data = [{"id": name, "object": "model", "created": created, "owned_by": "tpqueue"}
                for name, created in sorted(served.items())]
        return JSONResponse({"object": "list", "data": data})

    async def create(request: Request, kind: Kind) -> Response:
        body = await read_json(request, settings.http_max_body_bytes)
        completion = parse_chat(body) if kind == "chat" else parse_completion(body)
        completion, charge = await ratelimit.admit(request, completion, settings)  # key's priority, tokens (429)
        service = completions_of(request)
        async with charge.refunded_on_error():
            record, handles = await service.create(completion, session_header=request.headers.get("x-session-id"),
                                                   idempotency_key=request.headers.get("idempotency-key"))
        if completion.stream:
            return _sse(service.stream(record, handles, [0] * len(handles)))
        answer = await service.answer(record, handles)
        await charge.settle(answer)  # the real usage replaces the admission estimate
        return JSONResponse(answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create(request, "chat")

    @app.post("/v1/completions")
    async def text_completions(request: Request) -> Response:
        return await create(request, "text")

    for path, kind in KIND_OF_PATH.items():
        _add_existing_routes(app, path, kind, completions_of)
    app.state.route_templates = RouteTemplates([*app.router.routes, *(r for api in batch_api for r in api.routes)])
    return app


def _add_existing_routes(app: FastAPI, path: str, kind: Kind, completions_of: Any) -> None:
    """``GET /v1/<path>/{id}`` (a finished completion) and ``GET /v1/<path>/{id}/stream`` (resume)."""

    async def finished(request: Request, completion_id: str) -> JSONResponse:
        return JSONResponse(await completions_of(request).finished(kind, completion_id))

    async def resume(request: Request, completion_id: str) -> StreamingResponse:
        stream = await completions_of(request).resume(kind, completion_id, request.headers.get("last-event-id"))
        return _sse(stream)

    app.add_api_route(f"/v1/{path}/{{completion_id}}", finished, methods=["GET"])
    app.add_api_route(f"/v1/{path}/{{completion_id}}/stream", resume, methods=["GET"])
