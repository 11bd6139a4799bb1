"""The app factory: ``create_app(settings) -> FastAPI``, the routes and their wiring."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from gateway.auth import RequireKey
from gateway.chat import ChatCompletions, error_response
from gateway.metrics import CONTENT_TYPE
from gateway.protocol import ERROR_RESPONSES, GatewayError, chat_operation
from gateway.settings import Settings
from gateway.state import Gateway

log = logging.getLogger("gateway")
JSON = "application/json"
CHAT_PATH = "/v1/chat/completions"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app (reads ``GATEWAY_*`` from the environment when not given)."""
    settings = settings or Settings()
    gw = Gateway(settings)
    app = FastAPI(
        title="distill gateway",
        version="0.1.0",
        description="OpenAI-compatible gateway in front of vLLM: think shown, hidden or inline.",
        lifespan=_lifespan(gw),
    )
    app.state.gateway = gw
    _error_handlers(app)
    # first (before the docs routes FastAPI adds itself): the router tries routes in order,
    # and nearly every request is a chat request
    app.router.routes.insert(0, Route(CHAT_PATH, ChatCompletions(gw), methods=["POST"]))
    _ops_routes(app, gw)
    _unknown_v1(app)
    app.add_middleware(RequireKey, auth=gw.auth, rejected=lambda err, t: _rejected(gw, err, t))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _lifespan(gw: Gateway) -> Any:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not gw.auth.enabled:
            log.warning("no API keys configured: the gateway accepts every request")
        if gw.discovery is not None:
            await gw.discovery.start()
        learn = asyncio.ensure_future(_learn_models(gw))
        await gw.shadow.start()
        yield
        learn.cancel()
        await gw.shadow.stop()
        if gw.discovery is not None:
            await gw.discovery.aclose()
        await gw.pool.aclose()
        gw.access.close()

    return lifespan


async def _learn_models(gw: Gateway) -> None:
    """At startup, learn the upstreams' model names (for metric labels); best effort."""
    for _ in range(30):
        try:
            gw.learn_models(await gw.pool.list_models(timeout=2.0))
            return
        except Exception:
            await asyncio.sleep(2.0)


def _rejected(gw: Gateway, err: GatewayError, elapsed: float) -> None:
    """A request refused before it was read (no valid key): counted and logged, keyless."""
    rid = gw.request_id(None)
    gw.record(
        rid=rid, key=None, model=None, mode=None, stream=False, status=err.status,
        elapsed=elapsed, error=err.code,
    )  # fmt: skip


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return error_response(GatewayError(400, f"{where}: {first['msg']}", param=where))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(GatewayError(exc.status_code, str(exc.detail)))


def _ops_routes(app: FastAPI, gw: Gateway) -> None:
    """Health, readiness, metrics and the model list."""

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: ERROR_RESPONSES[503]})
    async def ready() -> Response:
        """An upstream answers its model list."""
        models = await gw.pool.list_models(timeout=min(gw.settings.connect_timeout, 5.0))
        gw.learn_models(models)
        return Response(orjson.dumps({"status": "ready", "models": len(models)}), media_type=JSON)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(gw.metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", tags=["openai"], responses=ERROR_RESPONSES)
    async def list_models() -> Response:
        """The models the upstreams serve."""
        models = await gw.pool.list_models()
        gw.learn_models(models)
        return Response(orjson.dumps({"object": "list", "data": models}), media_type=JSON)


def _unknown_v1(app: FastAPI) -> None:
    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def unknown_v1(path: str) -> Response:
        raise GatewayError(404, f"no route /v1/{path}", code="not_found")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the chat endpoint's operation."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema["paths"][CHAT_PATH] = {"post": chat_operation()}
        app.openapi_schema = schema
    return app.openapi_schema
