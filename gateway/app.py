"""The FastAPI app: ``create_app(settings) -> FastAPI``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.accesslog import AccessLog
from gateway.auth import Authenticator, KeyState, load_keys
from gateway.budget import BudgetTable, Plan
from gateway.discovery import DnsDiscovery, DnsTarget
from gateway.httpclient import ReadTimeout, UpstreamError
from gateway.httpclient import Response as UpstreamResponse
from gateway.metrics import CONTENT_TYPE, KnownModels, Metrics
from gateway.modes import Outcome, StreamShaper, resolve_mode, shape_completion, upstream_body
from gateway.planned import Features, PlannedStream, complete_planned
from gateway.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    GatewayError,
    error_payload,
    inline_schema,
)
from gateway.settings import Settings
from gateway.shadow import Shadow, ShadowSettings, completion_text
from gateway.tasks import TaskRegistry
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway")

JSON = "application/json"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
CHAT_PATH = "/v1/chat/completions"
_JSON_TYPE = (b"content-type", JSON.encode())
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class Gateway:
    """Everything one app instance shares: settings, upstream pool, keys, metrics, log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = UpstreamPool(settings, self.metrics)
        self.auth = Authenticator(load_keys(settings))
        self.models = KnownModels([*settings.models, *settings.tasks])
        self.tasks = TaskRegistry.load(settings.tasks)
        self.discovery = self._discovery(settings)
        self.features = Features(
            self.tasks, self.metrics.registry,
            budgets=BudgetTable.load(settings.reasoning_budgets),
            inject_system_prompt=settings.inject_system_prompt,
        )  # fmt: skip
        self.shadow = Shadow(ShadowSettings(), self.tasks, self.metrics.registry)
        self.access = AccessLog(settings.access_log)
        self._ids = itertools.count(1)
        self._id_prefix = f"gw-{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"

    def _discovery(self, settings: Settings) -> DnsDiscovery | None:
        """``GATEWAY_UPSTREAMS_DNS``: the pool's members follow the name's addresses."""
        if not settings.upstreams_dns:
            return None
        discovery = DnsDiscovery(
            DnsTarget.parse(settings.upstreams_dns),
            self.pool.set_members,
            interval=settings.upstreams_dns_interval,
            timeout=settings.connect_timeout,
        )
        self.pool.on_connect_error = discovery.connect_failed
        return discovery

    def request_id(self, given: str | None) -> str:
        if given and len(given) <= 128 and given.isprintable():
            return given
        return f"{self._id_prefix}{next(self._ids):x}"

    def record(
        self,
        *,
        rid: str,
        key: KeyState | None,
        model: str | None,
        mode: str | None,
        stream: bool,
        status: int,
        elapsed: float,
        upstream_wait: float,
        outcome: Outcome | None,
        error: str | None = None,
    ) -> None:
        """Metrics and the access-log line for one finished chat request (``elapsed``:
        seconds from its arrival to its response)."""
        m = self.metrics
        label = self.models.label(model)
        requests, duration = m.request_children(
            label, "true" if stream else "false", mode or "none", str(status)
        )
        requests.inc()
        duration.observe(elapsed)
        m.overhead.observe(max(elapsed - upstream_wait, 0.0))
        row: dict[str, Any] = {
            "request_id": rid,
            "key": key.fingerprint if key else None,
            "model": model,
            "mode": mode,
            "stream": stream,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if outcome is not None:
            m.tokens_prompt.inc(outcome.prompt_tokens)
            m.tokens_reasoning.inc(outcome.reasoning_tokens)
            m.tokens_answer.inc(outcome.answer_tokens)
            for kind in outcome.anomalies:
                m.think_anomalies.labels(kind).inc()
            if outcome.first_reasoning is not None:
                m.first_reasoning.labels(label).observe(outcome.first_reasoning)
            if outcome.first_answer is not None:
                m.first_answer.labels(label).observe(outcome.first_answer)
            row["prompt_tokens"] = outcome.prompt_tokens
            row["reasoning_tokens"] = outcome.reasoning_tokens
            row["answer_tokens"] = outcome.answer_tokens
            if outcome.anomalies:
                row["anomalies"] = outcome.anomalies
        if error:
            row["error"] = error
        self.access.write(row)


class _Reply:
    """A whole JSON response as two raw ASGI messages. ``done`` (the metrics and the access
    log line) runs once the response has left: it is not on the client's clock."""

    __slots__ = ("body", "done", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        done: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.done = done

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        headers = [_JSON_TYPE, (b"content-length", b"%d" % len(self.body)), *self.headers]
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            await send({"type": "http.response.body", "body": self.body})
        finally:
            if self.done is not None:
                self.done()


def _error_headers(err: GatewayError, rid: str | None) -> list[tuple[bytes, bytes]]:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in err.headers.items()]
    if rid:
        headers.append((b"x-request-id", rid.encode("latin-1")))
    return headers


def error_reply(err: GatewayError, rid: str | None = None) -> _Reply:
    """``err`` in OpenAI's error shape, as a raw ASGI response."""
    return _Reply(err.status, err.body(), _error_headers(err, rid))


def error_response(err: GatewayError) -> Response:
    """``err`` in OpenAI's error shape, for FastAPI's exception handlers."""
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=err.headers)


class _Head:
    """The request headers the gateway reads, found in one pass over the ASGI headers
    (the server gives names lower-cased; the first of repeated headers wins)."""

    __slots__ = ("authorization", "content_length", "request_id", "think")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        authorization = content_length = request_id = think = None
        for name, value in headers:
            if name == b"authorization":
                authorization = authorization or value
            elif name == b"content-length":
                content_length = content_length or value
            elif name == b"x-request-id":
                request_id = request_id or value
            elif name == b"x-think":
                think = think or value
        self.authorization = None if authorization is None else authorization.decode("latin-1")
        self.content_length: bytes | None = content_length
        self.request_id = None if request_id is None else request_id.decode("latin-1")
        self.think = None if think is None else think.decode("latin-1")


async def _read_body(receive: Callable[[], Awaitable[dict]], head: _Head, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over ``limit`` bytes."""
    length = head.content_length
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(413, f"request body over the {limit}-byte limit", code="body_too_large")
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise GatewayError(
                413, f"request body over the {limit}-byte limit", code="body_too_large"
            )
        if not message.get("more_body", False):
            return body


def _parse(body: bytes) -> tuple[dict[str, Any], ChatCompletionRequest]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the JSON body must be an object", code="invalid_json")
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise GatewayError(
            400, f"{where}: {first['msg']}", param=where, code="invalid_request"
        ) from None
    return data, req


async def _until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Guard:
    """Cancels one task, once, when its client disconnects or its deadline passes.

    Armed and disarmed from loop callbacks, so the timer and the disconnect watcher task are
    made while the upstream works, not on the request's critical path. The watcher is
    :func:`_until_disconnect`, as for streams.
    """

    __slots__ = ("active", "reason", "task", "timer", "watcher")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.active = True
        self.reason: type[Exception] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.watcher: asyncio.Task | None = None

    def arm(self, loop: asyncio.AbstractEventLoop, receive: Any, timeout: float) -> None:
        if self.active:
            self.timer = loop.call_later(timeout, self.stop, TimeoutError)
            self.watcher = loop.create_task(_until_disconnect(receive))
            self.watcher.add_done_callback(self._disconnected)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    def stop(self, reason: type[Exception]) -> None:
        if self.active and self.reason is None:
            self.reason = reason
            self.task.cancel()

    def _disconnected(self, watcher: asyncio.Task) -> None:
        """The watcher saw the client disconnect (not merely cancelled): stop the work."""
        if not watcher.cancelled() and watcher.exception() is None:
            self.stop(ClientGone)


async def _guarded(work: Awaitable[T], receive: Callable[[], Awaitable[dict]], timeout: float) -> T:
    """Await ``work`` (the body fully received); cancel it and raise ``ClientGone`` if the
    client disconnects first, or ``TimeoutError`` after ``timeout`` seconds.

    One timer and one watcher task, set up and torn down off the critical path: the
    same as ``asyncio.timeout`` around a watcher coroutine, at a fraction of the latency.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    guard = _Guard(task)
    loop.call_soon(guard.arm, loop, receive, timeout)
    try:
        return await work
    except asyncio.CancelledError:
        if guard.reason is not None and task.uncancel() == 0:
            raise guard.reason from None
        raise
    finally:
        guard.active = False
        loop.call_soon(guard.disarm)


def _upstream_error(status: int, body: bytes, headers: Any) -> GatewayError:
    """An upstream's non-200 answer, in OpenAI's error shape, status passed through."""
    message = f"the model server answered {status}"
    code = param = None
    try:
        data = orjson.loads(body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            code, param = err.get("code"), err.get("param")
        elif isinstance(data, dict) and data.get("message"):
            message = str(data["message"])
    except orjson.JSONDecodeError:
        pass
    retry_after = headers.get("retry-after")
    extra = {"Retry-After": retry_after} if retry_after else None
    return GatewayError(
        status,
        message,
        code=None if code is None else str(code),
        param=None if param is None else str(param),
        headers=extra,
        reason="status_5xx" if status >= 500 else "status_4xx",
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway app (reads ``GATEWAY_*`` from the environment when not given)."""
    settings = settings or Settings()
    gw = Gateway(settings)

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

    app = GatewayApp(
        gw,
        title="distill gateway",
        version="0.1.0",
        description="OpenAI-compatible gateway in front of vLLM: think shown, hidden or inline.",
        lifespan=lifespan,
    )
    app.state.gateway = gw

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

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses={503: ERROR_RESPONSES[503]})
    async def ready() -> Response:
        """An upstream answers its model list."""
        models = await gw.pool.list_models(timeout=min(settings.connect_timeout, 5.0))
        for model in models:
            gw.models.learn(model["id"])
        return Response(orjson.dumps({"status": "ready", "models": len(models)}), media_type=JSON)

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus text exposition."""
        return Response(gw.metrics.scrape(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", tags=["openai"], responses=ERROR_RESPONSES)
    async def list_models() -> Response:
        """The models the upstreams serve."""
        models = await gw.pool.list_models()
        for model in models:
            gw.models.learn(model["id"])
        return Response(orjson.dumps({"object": "list", "data": models}), media_type=JSON)

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        responses={200: {"description": "A chat completion, or an SSE stream of chunks"}}
        | ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": inline_schema(ChatCompletionRequest)}},
            },
            "parameters": [
                {
                    "name": "X-Think",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "enum": ["separate", "hide", "inline"]},
                }
            ],
        },
    )
    async def chat_completions() -> Response:
        """OpenAI chat completions, streaming or not; the reasoning shown as the mode says."""
        # Served by GatewayApp.__call__ before routing; the route documents it (OpenAPI).
        raise GatewayError(500, "chat completions are served before routing")

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def unknown_v1(path: str) -> Response:
        raise GatewayError(404, f"no route /v1/{path}", code="not_found")

    return app


async def _learn_models(gw: Gateway) -> None:
    """At startup, learn the upstreams' model names (for metric labels); best effort."""
    for _ in range(30):
        try:
            for model in await gw.pool.list_models(timeout=2.0):
                gw.models.learn(model["id"])
            return
        except Exception:
            await asyncio.sleep(2.0)


class GatewayApp(FastAPI):
    """FastAPI (routes, OpenAPI, error handlers) behind a raw ASGI front: 401 on every
    ``/v1`` route without a valid key, and chat completions served from here.

    FastAPI's routing, middleware and Request/Response objects cost more than the gateway's
    whole overhead budget; the chat route stays declared, so it is in the OpenAPI.
    """

    def __init__(self, gw: Gateway, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gateway = gw

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            head = _Head(scope["headers"])
            try:
                key = self.gateway.auth.check(head.authorization)
            except GatewayError as err:
                await error_reply(err)(scope, receive, send)
                return
            if scope["path"] == CHAT_PATH and scope["method"] == "POST":
                reply = await _chat(self.gateway, head, key, receive)
                await reply(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


class _Call:
    """One chat request as the access log and the metrics see it."""

    __slots__ = (
        "elapsed", "error", "gw", "key", "mode", "model", "outcome", "rid", "status", "stream",
        "t0", "upstream_wait",
    )  # fmt: skip

    def __init__(self, gw: Gateway, rid: str, key: KeyState, t0: float) -> None:
        self.gw = gw
        self.rid = rid
        self.key = key
        self.t0 = t0
        self.model: str | None = None
        self.mode: str | None = None
        self.stream = False
        self.upstream_wait = 0.0
        self.status = 0
        self.elapsed = 0.0
        self.outcome: Outcome | None = None
        self.error: str | None = None

    def reply(
        self,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        outcome: Outcome | None = None,
        error: str | None = None,
    ) -> _Reply:
        """The response; it is recorded (metrics, access log) once it has been sent."""
        self.elapsed = time.perf_counter() - self.t0
        self.status, self.outcome, self.error = status, outcome, error
        return _Reply(status, body, headers, self.record)

    def fail(self, err: GatewayError, error: str | None = None) -> _Reply:
        error = error or err.code or err.message[:200]
        return self.reply(err.status, err.body(), _error_headers(err, self.rid), error=error)

    def record(self) -> None:
        """Metrics and the access-log line (called once the response has been sent)."""
        self.gw.record(
            rid=self.rid, key=self.key, model=self.model, mode=self.mode, stream=self.stream,
            status=self.status, elapsed=self.elapsed, upstream_wait=self.upstream_wait,
            outcome=self.outcome, error=self.error,
        )  # fmt: skip


async def _chat(gw: Gateway, head: _Head, key: KeyState, receive: Any) -> _Reply | _SSEResponse:
    """POST /v1/chat/completions: the response to send (a whole one, or a stream)."""
    call = _Call(gw, gw.request_id(head.request_id), key, time.perf_counter())
    settings = gw.settings
    admitted = handed_off = False
    gw.metrics.in_flight_now += 1
    try:
        body = await _read_body(receive, head, settings.max_body_bytes)
        data, req = _parse(body)
        call.model, call.stream = req.model, req.stream
        call.mode = mode = resolve_mode(settings.think, head.think, req)
        key.take(time.monotonic())
        admitted = True
        plan = gw.features.prepare(data, gw.models.label)  # budget, labels (None: as is)
        payload = upstream_body(data, strip_history=settings.strip_history)
        if req.stream:
            wants_usage = bool(req.stream_options and req.stream_options.include_usage)
            handed_off = True  # the stream releases the key and the gauge when it ends
            return await _open_stream(gw, receive, call, req, mode, payload, wants_usage, plan)
        t_up = time.perf_counter()
        work = _complete(gw, payload) if plan is None else _planned(gw, plan, req.model, payload)
        response, raw = await _guarded(work, receive, settings.total_timeout)
        call.upstream_wait = time.perf_counter() - t_up
        if response.status != 200:
            raise _upstream_error(response.status, raw, response.headers)
        try:
            completion = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(
                502, "the model server sent malformed JSON", reason="bad_response"
            ) from None
        if gw.shadow.wants(req.model):
            gw.shadow.submit(req.model, data["messages"], completion_text(completion))
        outcome = shape_completion(
            completion, mode, settings.reasoning_field, settings.started_in_think
        )
        gw.models.learn(req.model)
        rid_header = (b"x-request-id", call.rid.encode("latin-1"))
        return call.reply(200, orjson.dumps(completion), [rid_header], outcome)
    except GatewayError as err:
        if err.reason:
            gw.metrics.upstream_errors.labels(err.reason).inc()
        return call.fail(err)
    except TimeoutError:
        gw.metrics.upstream_errors.labels("total_timeout").inc()
        err = GatewayError(504, "the model server took too long", code="upstream_timeout")
        return call.fail(err, "total_timeout")
    except ClientGone:
        call.upstream_wait = time.perf_counter() - call.t0
        err = GatewayError(499, "the client closed the connection")
        return call.fail(err, "client_disconnected")
    except Exception:
        log.exception("chat request %s failed", call.rid)
        return call.fail(GatewayError(500, "internal error in the gateway"), "internal")
    finally:
        if not handed_off:
            if admitted:
                key.release()
            gw.metrics.in_flight_now -= 1


async def _complete(gw: Gateway, payload: bytes) -> tuple[UpstreamResponse, bytes]:
    """One non-streamed upstream call: the response (status, headers) and its body."""
    up, response = await gw.pool.open(payload)
    return response, await _read_all(up, response)


def _planned(gw: Gateway, plan: Plan, model: str, payload: bytes) -> Awaitable[Any]:
    """Both phases of a planned request, not streamed (see :mod:`gateway.planned`)."""
    done = gw.features.observer(gw.models.label(model))
    return complete_planned(plan, payload, lambda body: _complete(gw, body), done)


async def _open_ok(gw: Gateway, payload: bytes) -> tuple[Upstream, UpstreamResponse]:
    """Open an upstream stream; a non-200 answer is read and raised as a GatewayError."""
    up, response = await gw.pool.open(payload)
    if response.status != 200:
        raw = await _read_all(up, response)
        raise _upstream_error(response.status, raw, response.headers)
    return up, response


async def _read_all(up: Upstream, response: UpstreamResponse) -> bytes:
    """The response's whole body; the upstream is done with either way."""
    complete = False
    try:
        raw = await response.read()
        complete = True
        return raw
    except ReadTimeout:
        raise GatewayError(
            504, "the model server sent no response in time", reason="first_byte_timeout"
        ) from None
    except UpstreamError:
        raise GatewayError(502, "the model server closed the connection", reason="closed") from None
    finally:  # an unfinished read (timeout, client gone) closes: vLLM then aborts
        if complete:
            response.release()
        else:
            response.close()
        up.in_flight -= 1


async def _open_stream(
    gw: Gateway,
    receive: Any,
    call: _Call,
    req: ChatCompletionRequest,
    mode: str,
    payload: bytes,
    wants_usage: bool,
    plan: Plan | None = None,
) -> _SSEResponse:
    """Open the upstream stream; errors before its first byte are plain HTTP errors."""
    settings = gw.settings
    key = call.key
    t_up = time.perf_counter()
    try:
        if plan is None:
            opening = _open_ok(gw, payload)
        else:  # both phases, read by the relay as one upstream response
            done = gw.features.observer(gw.models.label(req.model))
            opening = PlannedStream(plan, payload, lambda b: _open_ok(gw, b), done).opened()
        up, response = await _guarded(opening, receive, settings.total_timeout)
    except BaseException:
        key.release()
        gw.metrics.in_flight_now -= 1
        raise
    shaper = StreamShaper(
        mode,
        settings.reasoning_field,
        settings.started_in_think,
        client_wants_usage=wants_usage,
        t0=call.t0,
    )
    relay = _Relay(gw, up, response, shaper, time.perf_counter() - t_up)
    if gw.shadow.wants(req.model):
        relay.kept = []  # the raw upstream bytes, for the shadow to read the student's label
    headers = {**SSE_HEADERS, "x-request-id": call.rid}

    def finished(status: int, error: str | None) -> None:
        key.release()
        gw.metrics.in_flight_now -= 1
        if status == 200:
            gw.models.learn(req.model)
            if relay.kept is not None:
                gw.shadow.submit(
                    req.model,
                    [{"role": m.role, "content": m.content} for m in req.messages],
                    relay.kept,
                )
        call.elapsed = time.perf_counter() - call.t0
        call.status, call.error, call.outcome = status, error, shaper.outcome
        call.upstream_wait = relay.upstream_wait
        call.record()

    return _SSEResponse(relay, headers, finished)


class _Relay:
    """Reads the upstream SSE bytes, shapes each event, yields what the client gets."""

    def __init__(
        self,
        gw: Gateway,
        upstream: Upstream,
        response: UpstreamResponse,
        shaper: StreamShaper,
        upstream_wait: float,
    ) -> None:
        self.gw = gw
        self.upstream = upstream
        self.response = response
        self.shaper = shaper
        self.upstream_wait = upstream_wait
        self.status = 200
        self.error: str | None = None
        self._released = False
        self.kept: list[bytes] | None = None

    async def close(self) -> None:
        """Done with the upstream: keep the connection if the stream ended cleanly, else
        close it (which makes vLLM abort the generation and free the slot)."""
        if not self._released:
            self._released = True
            if self.shaper.finished and self.response.complete:
                self.response.release()
            else:
                self.response.close()
            self.upstream.in_flight -= 1

    async def _reads(self) -> AsyncIterator[bytes]:
        """Upstream body pieces; in hide mode an empty piece marks a keep-alive tick."""
        chunks = self.response.chunks().__aiter__()
        perf = time.perf_counter
        if self.shaper.mode != "hide":
            while True:
                t = perf()
                try:
                    piece = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self.upstream_wait += perf() - t
                yield piece
        interval = self.gw.settings.keepalive_interval
        pending: asyncio.Future | None = None
        try:
            while True:
                t = perf()
                if pending is None:
                    pending = asyncio.ensure_future(chunks.__anext__())
                done, _ = await asyncio.wait((pending,), timeout=interval)
                self.upstream_wait += perf() - t
                if not done:
                    yield b""
                    continue
                try:
                    piece = pending.result()
                except StopAsyncIteration:
                    return
                finally:
                    pending = None
                yield piece
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)

    async def events(self) -> AsyncIterator[bytes]:
        """What to send to the client, one write per upstream read (``[DONE]`` excluded)."""
        settings = self.gw.settings
        shaper = self.shaper
        event = shaper.event
        buf = b""
        last_write = time.monotonic()
        try:
            async with asyncio.timeout(settings.total_timeout):
                async for piece in self._reads():
                    if self.kept is not None:
                        self.kept.append(piece)
                    if b"\r" in piece:
                        piece = piece.replace(b"\r\n", b"\n")
                    buf = buf + piece if buf else piece
                    out = []
                    pos = 0
                    while (end := buf.find(b"\n\n", pos)) >= 0:
                        if buf.startswith(b"data: ", pos) and buf.find(b"\n", pos, end) < 0:
                            payload = buf[pos + 6 : end]  # the usual one-line event
                        else:
                            payload = _data_of(buf[pos:end])
                        pos = end + 2
                        if payload is not None:
                            shaped = event(payload)
                            if shaped is not None:
                                out.append(shaped)
                    buf = buf[pos:] if pos else buf
                    now = time.monotonic()
                    if out:
                        last_write = now
                        yield b"".join(out)
                    elif now - last_write >= settings.keepalive_interval:
                        last_write = now
                        yield KEEPALIVE
            if not shaper.finished:
                raise GatewayError(502, "the model server ended the stream early", reason="closed")
        except GatewayError as err:
            yield self._fail(err.status, err.reason or "bad_response", err.message)
        except ReadTimeout:
            yield self._fail(504, "first_byte_timeout", "the model server stopped sending")
        except UpstreamError:
            yield self._fail(502, "closed", "the model server closed the stream")
        except TimeoutError:
            yield self._fail(504, "total_timeout", "the model server took too long")
        finally:
            await self.close()

    def _fail(self, status: int, reason: str, message: str) -> bytes:
        self.status = status
        self.error = reason
        self.gw.metrics.upstream_errors.labels(reason).inc()
        body = error_payload(status, message, code=reason)
        return b"data: " + orjson.dumps(body) + b"\n\n"


def _data_of(event: bytes) -> bytes | None:
    """The ``data`` of one SSE event (None for comments and data-less events)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


class _SSEResponse(Response):
    """Streams the relay to the client; a client disconnect cancels it (and the upstream)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        relay: _Relay,
        headers: dict[str, str],
        finished: Callable[[int, str | None], None],
    ) -> None:
        super().__init__(content=None, status_code=200, headers=headers)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.relay = relay
        self.finished = finished

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        relay = self.relay
        self._done = False
        status, error = 200, None
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pump = asyncio.ensure_future(self._pump(send))
            watcher = asyncio.ensure_future(_until_disconnect(receive))
            try:
                await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
                if not pump.done():
                    pump.cancel()
                    status, error = 499, "client_disconnected"
                await asyncio.gather(pump, return_exceptions=True)
            if status == 200 and not pump.cancelled() and pump.exception() is not None:
                status, error = 499, f"send failed: {type(pump.exception()).__name__}"
        finally:
            await relay.close()
            self._finish(status, error)

    def _finish(self, status: int, error: str | None) -> None:
        if not self._done:
            self._done = True
            self.finished(status, error)

    async def _pump(self, send: Any) -> None:
        events = self.relay.events()
        try:
            async for piece in events:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        finally:
            await events.aclose()
        # Record before [DONE], so whoever sees the stream end also sees its metrics.
        self._finish(self.relay.status, self.relay.error)
        last = DONE if self.relay.status == 200 else b""
        await send({"type": "http.response.body", "body": last, "more_body": False})
