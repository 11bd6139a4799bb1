"""HTTP to one upstream: an aiohttp session behind a small interface.

The rest of the gateway sees :class:`Transport` (``request`` → :class:`Response`) and four
errors, so the HTTP library stays an implementation detail of this module. The errors tell a
request that never reached the upstream (:class:`ConnectError`, safe to send elsewhere) from
one that did (:class:`Disconnected`, :class:`ReadTimeout`: never re-sent, since the upstream
may already be generating).

Closing a response whose body is unfinished closes its connection: that is how a generation
is aborted (vLLM sees the disconnect and frees the slot).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

# Idle keep-alive connections are dropped before the server drops them (uvicorn, and so
# vLLM, closes idle connections after 5 s): a request never lands on a connection the
# server is closing. It is also what bounds the idle pool after a burst.
KEEPALIVE_S = 4.0


class UpstreamError(Exception):
    """Talking to the upstream failed."""


class ConnectError(UpstreamError):
    """No connection could be made: the request never reached the upstream."""


class ConnectTimeout(ConnectError):
    """The connection was not made within the connect timeout."""


class ReadTimeout(UpstreamError):
    """The upstream sent nothing for the read timeout (first byte, or mid-body)."""


class Disconnected(UpstreamError):
    """The upstream closed the connection before the response was complete."""


def _mapped(exc: BaseException) -> UpstreamError | None:
    """aiohttp's exception as ours (None: not a transport failure)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(str(exc))
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return ReadTimeout(str(exc))
    if isinstance(exc, aiohttp.ClientError):
        return Disconnected(f"{type(exc).__name__}: {exc}")
    return None


class Response:
    """An upstream response whose status and headers are read and whose body is not."""

    __slots__ = ("_raw", "complete", "headers", "status")

    def __init__(self, raw: aiohttp.ClientResponse) -> None:
        self._raw = raw
        self.status = raw.status
        self.headers = raw.headers  # case-insensitive
        self.complete = False

    async def read(self) -> bytes:
        """The whole body."""
        try:
            body = await self._raw.read()
        except aiohttp.ClientError as e:
            raise _mapped(e) from None
        self.complete = True
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        content = self._raw.content
        try:
            while piece := await content.readany():
                yield piece
        except aiohttp.ClientError as e:
            raise _mapped(e) from None
        self.complete = True

    def end(self) -> None:
        """Done with it: a finished response keeps its connection, an unfinished one closes
        it (which aborts the generation)."""
        if self.complete:
            self._raw.release()
        else:
            self._raw.close()


class Transport:
    """One upstream's connection pool (created in the running event loop on first use)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._urls: dict[str, URL] = {}  # parsed once per path
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._max_connections = max_connections
        # every request the gateway sends with a body is JSON
        self._headers = {"content-type": "application/json", **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
        )
        return aiohttp.ClientSession(
            connector=connector,
            # one session carries every client's requests: a cookie an upstream sets for one
            # must never be sent with another's
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            headers=self._headers,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float | None = None
    ) -> Response:
        """Send a request and read the response head."""
        session = self._session
        if session is None:
            session = self._session = self._open_session()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            raw = await session.request(method, url, data=body, **kwargs)
        except aiohttp.ClientError as e:
            raise _mapped(e) from None
        return Response(raw)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
