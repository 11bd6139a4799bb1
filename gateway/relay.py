"""The streamed answer: upstream SSE bytes in, shaped SSE events out to the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson

from gateway.call import Call
from gateway.modes import StreamShaper
from gateway.protocol import GatewayError, error_payload
from gateway.sse import SSEDecoder
from gateway.state import Gateway
from gateway.transport import Disconnected, ReadTimeout

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class Source(Protocol):
    """An upstream stream: one upstream lease, or the phases of a planned request."""

    def chunks(self) -> AsyncIterator[bytes]: ...


class Relay:
    """Reads ``source``, shapes each event for the client and ends the ``call`` (before
    ``[DONE]``, so a client that has seen the end also sees the request's metrics)."""

    def __init__(
        self,
        gw: Gateway,
        call: Call,
        source: Source,
        shaper: StreamShaper,
        shadow: tuple[str, list[dict[str, Any]]] | None = None,
    ) -> None:
        self.gw = gw
        self.call = call
        self.source = source
        self.shaper = shaper
        self.shadow = shadow  # (model, messages): the shadow reads the raw upstream bytes
        self.kept: list[bytes] = []

    async def events(self) -> AsyncIterator[bytes]:
        """What the client gets: shaped events, keep-alives, and ``[DONE]`` or an error event."""
        settings = self.gw.settings
        shaper, decoder = self.shaper, SSEDecoder()
        status, error = 499, "client_disconnected"  # unless the stream ends otherwise
        last_write = time.monotonic()
        try:
            async with asyncio.timeout(settings.total_timeout):
                async for piece in self._reads():
                    if self.shadow is not None:
                        self.kept.append(piece)
                    out = [b for p in decoder.feed(piece) if (b := shaper.event(p)) is not None]
                    now = time.monotonic()
                    if out:
                        last_write = now
                        yield b"".join(out)
                    elif now - last_write >= settings.keepalive_interval:
                        last_write = now
                        yield KEEPALIVE
            if not shaper.finished:
                raise GatewayError(502, "the model server ended the stream early", reason="closed")
            status, error = 200, None
        except GatewayError as err:
            status, error = err.status, err.reason or "bad_response"
            yield self._error_event(status, error, err.message)
        except ReadTimeout:
            status, error = 504, "first_byte_timeout"
            yield self._error_event(status, error, "the model server stopped sending")
        except Disconnected:
            status, error = 502, "closed"
            yield self._error_event(status, error, "the model server closed the stream")
        except TimeoutError:
            status, error = 504, "total_timeout"
            yield self._error_event(status, error, "the model server took too long")
        finally:
            self._end(status, error)
        if status == 200:
            yield DONE

    def _end(self, status: int, error: str | None) -> None:
        call = self.call
        call.outcome = self.shaper.outcome
        if status == 200 and self.shadow is not None:
            self.gw.shadow.submit(*self.shadow, self.kept)
        call.close(status, error)

    async def _reads(self) -> AsyncIterator[bytes]:
        """Upstream body pieces, the time waited on them added to the call's upstream wait;
        in hide mode an empty piece marks a keep-alive tick (the client sees nothing else
        while the model reasons)."""
        chunks = self.source.chunks().__aiter__()
        call, perf = self.call, time.perf_counter
        if self.shaper.mode != "hide":
            while True:
                t = perf()
                try:
                    piece = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    call.upstream_wait += perf() - t
                yield piece
        interval = self.gw.settings.keepalive_interval
        pending: asyncio.Future | None = None
        try:
            while True:
                t = perf()
                if pending is None:
                    pending = asyncio.ensure_future(chunks.__anext__())
                done, _ = await asyncio.wait((pending,), timeout=interval)
                call.upstream_wait += perf() - t
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

    def _error_event(self, status: int, reason: str, message: str) -> bytes:
        self.gw.metrics.upstream_errors.labels(reason).inc()
        body = error_payload(status, message, code=reason)
        return b"data: " + orjson.dumps(body) + b"\n\n"
