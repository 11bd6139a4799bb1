"""``distill-gateway`` / ``python -m gateway``: serve the gateway with uvicorn."""

from __future__ import annotations

import gc
import ipaddress
import sys
from typing import Any


class _JoinHead:
    """One response's view of the connection: the status line and headers of a response
    with a ``content-length`` are held until its body is written, so both leave in one
    ``send()`` (uvicorn writes them separately; each loopback write costs ~50 µs)."""

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, transport: Any, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif (
            self._cycle is not None
            and self._cycle.chunked_encoding is False
            and self._cycle.response_started
            and not self._cycle.response_complete
        ):
            self._cycle = None  # only the first write of the response is held
            self._head = data
        else:
            self._cycle = None
            self._transport.write(data)

    def close(self) -> None:
        self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _http_protocol() -> Any:
    """uvicorn's httptools protocol, writing each whole response in one ``send()``; plain
    ``"httptools"`` if this uvicorn's internals are not the ones this was written for."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "httptools"
    if not hasattr(HttpToolsProtocol, "on_headers_complete"):
        return "httptools"

    class JoinedWrites(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = getattr(self, "cycle", None)
            if (
                cycle is not None
                and getattr(cycle, "scope", None) is self.scope
                and self.scope["method"] != "HEAD"
                and hasattr(cycle, "chunked_encoding")
            ):
                cycle.transport = _JoinHead(cycle.transport, cycle)

    return JoinedWrites


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    """Read ``GATEWAY_*`` settings and serve (uvloop + httptools, no uvicorn access log)."""
    import uvicorn
    from pydantic import ValidationError

    from gateway.auth import KeysFileError
    from gateway.settings import Settings

    try:
        settings = Settings()
        from gateway.app import create_app

        app = create_app(settings)
    except (ValidationError, KeysFileError) as e:
        print(f"distill-gateway: bad settings: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not app.state.gateway.auth.enabled and not (
        settings.allow_anonymous or is_loopback(settings.host)
    ):
        print(
            f"distill-gateway: refusing to listen on {settings.host} without API keys: set "
            "GATEWAY_API_KEYS or GATEWAY_API_KEYS_FILE, or GATEWAY_ALLOW_ANONYMOUS=true",
            file=sys.stderr,
        )
        raise SystemExit(2)
    # Everything built so far (modules, the app) lives as long as the process: keep the
    # cyclic GC from walking it again and again (a full collection takes tens of ms).
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=_http_protocol(),
        access_log=False,
        log_level=settings.log_level,
        server_header=False,
        proxy_headers=False,  # the gateway reads neither the client address nor the scheme
        date_header=False,
        backlog=4096,
        timeout_keep_alive=75,
    )


if __name__ == "__main__":
    main()
