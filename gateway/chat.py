"""``POST /v1/chat/completions``: read, check, send upstream, answer whole or as a stream.

:class:`ChatCompletions` is the route's ASGI endpoint. The whole response, streamed or not,
is sent inside one ``async with Call(...)`` (:mod:`gateway.call`), so whatever happens the
request's key slot, upstream lease and in-flight count are given back and it is recorded once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.call import Call
from gateway.flywheel import completion_text
from gateway.modes import StreamShaper, resolve_mode, shape_completion, upstream_body
from gateway.planned import PlannedStream, complete_planned
from gateway.protocol import ChatCompletionRequest, GatewayError
from gateway.relay import SSE_HEADERS, Relay
from gateway.state import Gateway
from gateway.transport import Response as UpstreamResponse
from gateway.upstreams import Lease

log = logging.getLogger("gateway")
JSON = "application/json"
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection before the response was ready."""


def error_response(err: GatewayError, rid: str | None = None) -> Response:
    """``err`` in OpenAI's error shape."""
    headers = {**err.headers, "x-request-id": rid} if rid else err.headers
    return Response(err.body(), status_code=err.status, media_type=JSON, headers=headers)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body over the {limit}-byte limit", code="body_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to be over ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)


def parse(body: bytes, max_messages: int) -> tuple[dict[str, Any], ChatCompletionRequest]:
    """The JSON body and its validated view; 400 naming the field that is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the JSON body must be an object", code="invalid_json")
    messages = data.get("messages")
    # checked before validation, whose cost grows with the count: one client must not be
    # able to hold the event loop (and so every other client) for long
    if isinstance(messages, list) and len(messages) > max_messages:
        raise GatewayError(
            400, f"messages: at most {max_messages} messages in one request",
            param="messages", code="too_many_messages",
        )  # fmt: skip
    try:
        req = ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise GatewayError(
            400, f"{where}: {first['msg']}", param=where, code="invalid_request"
        ) from None
    return data, req


def upstream_error(status: int, body: bytes, headers: Any) -> GatewayError:
    """An upstream's non-200 answer in OpenAI's error shape, status passed through (the
    client sees the upstream's message; the access log only its status and reason)."""
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
    return GatewayError(
        status,
        message,
        code=None if code is None else str(code),
        param=None if param is None else str(param),
        headers={"Retry-After": retry_after} if retry_after else None,
        reason="status_5xx" if status >= 500 else "status_4xx",
    )


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def guarded(work: Awaitable[T], receive: Receive, timeout: float) -> T:
    """Await ``work`` (the body already read): ``ClientGone`` if the client disconnects
    first, ``TimeoutError`` after ``timeout`` seconds; either way ``work`` is cancelled."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async with asyncio.timeout(timeout):
            return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:  # cancelled by the watcher, not from outside
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


class ChatCompletions:
    """The ASGI endpoint of ``POST /v1/chat/completions`` (the key is checked before)."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gw
        request = Request(scope, receive)
        async with Call(
            gw, scope["state"]["key"], gw.request_id(request.headers.get("x-request-id"))
        ) as call:
            try:
                response = await self._answer(call, request)
            except GatewayError as err:
                response = self._fail(call, err, err.reason or err.code or f"http_{err.status}")
            except TimeoutError:
                gw.metrics.upstream_errors.labels("total_timeout").inc()
                err = GatewayError(504, "the model server took too long", code="upstream_timeout")
                response = self._fail(call, err, "total_timeout")
            except ClientGone:
                call.upstream_wait = time.perf_counter() - call.t0
                call.close(499, "client_disconnected")
                return
            except Exception:  # a bug: still an answer in OpenAI's shape, and a log line
                log.exception("chat request %s failed", call.rid)
                err = GatewayError(500, "internal error in the gateway")
                response = self._fail(call, err, "internal")
            try:
                await response(scope, receive, send)
            except OSError:  # the client left while its response was being sent
                call.close(499, "client_disconnected")
            if not call.stream:  # a stream's relay closes the call as the stream ends
                call.close(response.status_code)

    def _fail(self, call: Call, err: GatewayError, reason: str) -> Response:
        """The error response; the call records ``reason``, never the message."""
        if err.reason:
            self.gw.metrics.upstream_errors.labels(err.reason).inc()
        call.respond()
        response = error_response(err, call.rid)
        call.close(err.status, reason)
        return response

    async def _answer(self, call: Call, request: Request) -> Response:
        gw, settings = self.gw, self.gw.settings
        body = await read_body(request, settings.max_body_bytes)
        data, req = parse(body, settings.max_messages)
        call.model, call.stream = req.model, req.stream
        call.mode = resolve_mode(settings.think, request.headers.get("x-think"), req)
        call.admit()
        plan = gw.features.prepare(data, gw.models.label)  # budget, labels (None: as is)
        payload = upstream_body(data, strip_history=settings.strip_history)
        if req.stream:
            return await self._stream(call, request, req, payload, plan)
        t_up = time.perf_counter()
        if plan is None:
            work = self._complete(call, payload)
        else:
            observe = gw.features.observer(gw.models.label(req.model))
            work = complete_planned(plan, payload, lambda b: self._complete(call, b), observe)
        response, raw = await guarded(work, request.receive, settings.total_timeout)
        call.upstream_wait = time.perf_counter() - t_up
        if response.status != 200:
            raise upstream_error(response.status, raw, response.headers)
        try:
            completion = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise GatewayError(
                502, "the model server sent malformed JSON", reason="bad_response"
            ) from None
        if gw.shadow.wants(req.model):
            gw.shadow.submit(req.model, data["messages"], completion_text(completion))
        call.outcome = shape_completion(
            completion, call.mode, settings.reasoning_field, settings.started_in_think, gw.tokens
        )
        call.respond()
        return Response(
            orjson.dumps(completion), media_type=JSON, headers={"x-request-id": call.rid}
        )

    async def _complete(self, call: Call, payload: bytes) -> tuple[UpstreamResponse, bytes]:
        """One whole upstream answer: the response (status, headers) and its body."""
        lease = await call.lease(payload)
        assert lease.response is not None
        return lease.response, await lease.read()

    async def _open_ok(self, call: Call, payload: bytes) -> Lease:
        """An upstream stream; a non-200 answer is read and raised as a GatewayError."""
        lease = await call.lease(payload)
        assert lease.response is not None
        if lease.response.status != 200:
            raw = await lease.read()
            raise upstream_error(lease.response.status, raw, lease.response.headers)
        return lease

    async def _stream(
        self, call: Call, request: Request, req: ChatCompletionRequest, payload: bytes, plan: Any
    ) -> Response:
        """Open the upstream stream (errors before its first byte are plain HTTP errors),
        then relay it."""
        gw, settings = self.gw, self.gw.settings
        t_up = time.perf_counter()
        if plan is None:
            opening: Awaitable[Any] = self._open_ok(call, payload)
        else:  # both phases, read by the relay as one upstream response
            observe = gw.features.observer(gw.models.label(req.model))
            planned = PlannedStream(plan, payload, lambda b: self._open_ok(call, b), observe)
            opening = planned.opened()
        source = await guarded(opening, request.receive, settings.total_timeout)
        call.upstream_wait = time.perf_counter() - t_up
        wants_usage = bool(req.stream_options and req.stream_options.include_usage)
        shaper = StreamShaper(
            call.mode or "separate", settings.reasoning_field, settings.started_in_think,
            client_wants_usage=wants_usage, t0=call.t0, counter=gw.tokens,
        )  # fmt: skip
        shadow = None
        if gw.shadow.wants(req.model):
            messages = [{"role": m.role, "content": m.content} for m in req.messages]
            shadow = (req.model, messages)
        relay = Relay(gw, call, source, shaper, shadow)
        return StreamingResponse(
            relay.events(), media_type="text/event-stream",
            headers={**SSE_HEADERS, "x-request-id": call.rid},
        )  # fmt: skip
