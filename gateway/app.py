"""The FastAPI app: ``create_app(settings) -> FastAPI``."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.accesslog import AccessLog
from gateway.auth import Authenticator, KeyState, load_keys
from gateway.httpclient import ReadTimeout, UpstreamError
from gateway.httpclient import Response as UpstreamResponse
from gateway.metrics import CONTENT_TYPE, KnownModels, Metrics
from gateway.modes import Outcome, StreamShaper, resolve_mode, shape_completion, upstream_body
from gateway.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    GatewayError,
    error_payload,
    inline_schema,
)
from gateway.settings import Settings
from gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("gateway")

JSON = "application/json"
KEY_SCOPE = "gateway.key"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The client closed the connection before the response was complete."""


class Gateway:
    """Everything one app instance shares: settings, upstream pool, keys, metrics, log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = UpstreamPool(settings, self.metrics)
        self.auth = Authenticator(load_keys(settings))
        self.models = KnownModels(settings.models)
        self.access = AccessLog(settings.access_log)
        self._ids = itertools.count(1)
        self._id_prefix = f"gw-{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"

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
        t0: float,
        upstream_wait: float,
        outcome: Outcome | None,
        error: str | None = None,
    ) -> None:
        """Metrics and the access-log line for one finished chat request."""
        elapsed = time.perf_counter() - t0
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


def error_response(err: GatewayError, rid: str | None = None) -> Response:
    headers = dict(err.headers)
    if rid:
        headers["x-request-id"] = rid
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(413, f"request body over the {limit}-byte limit", code="body_too_large")
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise GatewayError(
                413, f"request body over the {limit}-byte limit", code="body_too_large"
            )
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


async def _race_disconnect(work: Awaitable[Any], receive: Callable[[], Awaitable[dict]]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    me = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _until_disconnect(receive)
        gone = True
        me.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            me.uncancel()
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


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
        learn = asyncio.ensure_future(_learn_models(gw))
        yield
        learn.cancel()
        await gw.pool.aclose()
        gw.access.close()

    app = FastAPI(
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
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions, streaming or not; the reasoning shown as the mode says."""
        return await _chat(gw, request)

    @app.api_route(
        "/v1/{path:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
        include_in_schema=False,
    )
    async def unknown_v1(path: str) -> Response:
        raise GatewayError(404, f"no route /v1/{path}", code="not_found")

    app.add_middleware(_FastPath, gw=gw)
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


class _FastPath:
    """Pure ASGI in front of FastAPI: 401 on every ``/v1`` route without a valid key, and
    chat completions served straight from here (FastAPI's routing and dependency layers
    cost more than the gateway's whole overhead budget; the route stays in the OpenAPI)."""

    def __init__(self, app: Any, gw: Gateway) -> None:
        self.app = app
        self.gw = gw

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            try:
                scope[KEY_SCOPE] = self.gw.auth.check(authorization)
            except GatewayError as err:
                await error_response(err)(scope, receive, send)
                return
            if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
                response = await _chat(self.gw, Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _chat(gw: Gateway, request: Request) -> Response:
    t0 = time.perf_counter()
    settings = gw.settings
    key: KeyState = request.scope[KEY_SCOPE]
    rid = gw.request_id(request.headers.get("x-request-id"))
    model = mode = None
    stream = False
    admitted = handed_off = False
    upstream_wait = 0.0
    gw.metrics.in_flight.inc()
    try:
        body = await _read_body(request, settings.max_body_bytes)
        data, req = _parse(body)
        model, stream = req.model, req.stream
        mode = resolve_mode(settings.think, request.headers.get("x-think"), req)
        key.take(time.monotonic())
        admitted = True
        payload = upstream_body(data, strip_history=settings.strip_history)
        if stream:
            wants_usage = bool(req.stream_options and req.stream_options.include_usage)
            handed_off = True  # the stream releases the key and the gauge when it ends
            return await _open_stream(gw, request, rid, key, req, mode, payload, wants_usage, t0)
        t_up = time.perf_counter()
        async with asyncio.timeout(settings.total_timeout):
            status, raw, headers = await _race_disconnect(_complete(gw, payload), request.receive)
        upstream_wait = time.perf_counter() - t_up
        if status != 200:
            raise _upstream_error(status, raw, headers)
        try:
            completion = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(
                502, "the model server sent malformed JSON", reason="bad_response"
            ) from None
        outcome = shape_completion(
            completion, mode, settings.reasoning_field, settings.started_in_think
        )
        gw.models.learn(model)
        out = Response(orjson.dumps(completion), media_type=JSON, headers={"x-request-id": rid})
        gw.record(
            rid=rid, key=key, model=model, mode=mode, stream=False, status=200, t0=t0,
            upstream_wait=upstream_wait, outcome=outcome,
        )  # fmt: skip
        return out
    except GatewayError as err:
        if err.reason:
            gw.metrics.upstream_errors.labels(err.reason).inc()
        gw.record(
            rid=rid, key=key, model=model, mode=mode, stream=stream, status=err.status, t0=t0,
            upstream_wait=upstream_wait, outcome=None, error=err.code or err.message[:200],
        )  # fmt: skip
        return error_response(err, rid)
    except TimeoutError:
        gw.metrics.upstream_errors.labels("total_timeout").inc()
        err = GatewayError(504, "the model server took too long", code="upstream_timeout")
        gw.record(
            rid=rid, key=key, model=model, mode=mode, stream=stream, status=504, t0=t0,
            upstream_wait=upstream_wait, outcome=None, error="total_timeout",
        )  # fmt: skip
        return error_response(err, rid)
    except ClientGone:
        gw.record(
            rid=rid, key=key, model=model, mode=mode, stream=stream, status=499, t0=t0,
            upstream_wait=time.perf_counter() - t0, outcome=None, error="client_disconnected",
        )  # fmt: skip
        return Response(status_code=499)
    finally:
        if not handed_off:
            if admitted:
                key.release()
            gw.metrics.in_flight.dec()


async def _complete(gw: Gateway, payload: bytes) -> tuple[int, bytes, Any]:
    """One non-streamed upstream call: (status, body, headers)."""
    up, response = await gw.pool.open(payload)
    return response.status, await _read_all(up, response), response.headers


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
    request: Request,
    rid: str,
    key: KeyState,
    req: ChatCompletionRequest,
    mode: str,
    payload: bytes,
    wants_usage: bool,
    t0: float,
) -> Response:
    """Open the upstream stream; errors before its first byte are plain HTTP errors."""
    settings = gw.settings
    t_up = time.perf_counter()
    try:
        async with asyncio.timeout(settings.total_timeout):
            up, response = await _race_disconnect(gw.pool.open(payload), request.receive)
            if response.status != 200:
                raw = await _read_all(up, response)
                raise _upstream_error(response.status, raw, response.headers)
    except BaseException:
        key.release()
        gw.metrics.in_flight.dec()
        raise
    shaper = StreamShaper(
        mode,
        settings.reasoning_field,
        settings.started_in_think,
        client_wants_usage=wants_usage,
        t0=t0,
    )
    relay = _Relay(gw, up, response, shaper, time.perf_counter() - t_up)
    headers = {**SSE_HEADERS, "x-request-id": rid}

    def finished(status: int, error: str | None) -> None:
        key.release()
        gw.metrics.in_flight.dec()
        if status == 200:
            gw.models.learn(req.model)
        gw.record(
            rid=rid, key=key, model=req.model, mode=mode, stream=True, status=status, t0=t0,
            upstream_wait=relay.upstream_wait, outcome=shaper.outcome, error=error,
        )  # fmt: skip

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
