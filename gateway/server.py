"""The HTTP server the gateway runs in: uvicorn (uvloop + httptools), with a connection limit
and a deadline for each request's head.

uvicorn has neither: a client that sends its headers a byte at a time (slowloris) holds its
connection forever, and enough of them exhaust the process's file descriptors. The protocol
below closes a connection whose request head is not complete ``header_timeout`` seconds after
the connection (or the request) began, and closes connections beyond ``max_connections`` at
once. It only extends the asyncio/httptools callbacks uvicorn's protocol implements.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.settings import Settings


def guarded_protocol(header_timeout: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a head deadline and a connection limit (one set of
    open connections per server)."""
    open_connections: set[HttpToolsProtocol] = set()

    class GuardedHttp(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _guard_transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(open_connections) >= max_connections:
                transport.abort()  # refused before uvicorn tracks it
                return
            open_connections.add(self)
            self._guard_transport = transport
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self not in open_connections:
                return  # refused in connection_made
            open_connections.discard(self)
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._deadline is None:
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _arm(self) -> None:
            loop = asyncio.get_running_loop()
            self._deadline = loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_too_slow(self) -> None:
            self._deadline = None
            if self._guard_transport is not None:
                self._guard_transport.close()

    return GuardedHttp


def build_server(settings: Settings, app: Any) -> uvicorn.Server:
    """The server ``distill-gateway`` runs (the tests start this one too)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guarded_protocol(settings.header_timeout, settings.max_connections),
        access_log=False,  # the gateway writes its own (gateway/accesslog.py)
        log_level=settings.log_level,
        server_header=False,
        proxy_headers=False,  # the gateway reads neither the client address nor the scheme
        date_header=False,
        backlog=4096,
        timeout_keep_alive=75,
    )
    return uvicorn.Server(config)


def freeze_heap() -> None:
    """Everything built before serving (modules, the app) lives as long as the process: move
    it out of the cyclic GC's reach, so a full collection walks only what requests made
    (otherwise it walks the whole heap, holding the GIL, while requests wait)."""
    gc.collect()
    gc.freeze()
