"""``GATEWAY_UPSTREAMS_DNS``: the upstream pool follows what a DNS name resolves to.

A Kubernetes headless Service answers with the address of every ready pod behind it. The
gateway resolves the name at start, every ``GATEWAY_UPSTREAMS_DNS_INTERVAL`` seconds and soon
after a failed connect, and gives the pool one base URL per address (``http://IP:PORT/v1``).
Replicas come and go without a restart; the pool lets requests already on a removed replica
finish. A failed lookup keeps the members the pool has; a name that no longer exists (no ready
pod) empties it.

Wiring (gateway/app.py): ``Gateway`` builds it with the pool's ``set_members`` and hooks its
``connect_failed()`` to the pool's ``on_connect_error``; the app's lifespan awaits ``start()``
before serving and ``aclose()`` at shutdown. With no member the pool picks no upstream (503
upstream_unavailable).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("gateway")

Resolver = Callable[[str, int], Awaitable[list[str]]]
# getaddrinfo's answers for "this name has no address" (as opposed to "try again")
NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, through the system resolver (``/etc/resolv.conf``:
    in a pod, the cluster DNS and its search domains)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


@dataclass(frozen=True)
class DnsTarget:
    """What to resolve and how to turn each address into an upstream base URL."""

    host: str
    port: int
    scheme: str = "http"
    path: str = "/v1"

    @classmethod
    def parse(cls, text: str) -> DnsTarget:
        """``host:port`` or ``http://host:port/v1`` (the path defaults to ``/v1``)."""
        raw = text.strip()
        parts = urlsplit(raw if "://" in raw else "http://" + raw)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{text!r}: the scheme must be http or https")
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(f"{text!r} is not host:port, e.g. vllm-headless.ns.svc:8000")
        if parts.query or parts.fragment or parts.username:
            raise ValueError(f"{text!r}: only scheme, host, port and path are allowed")
        return cls(parts.hostname, port, parts.scheme, parts.path.rstrip("/") or "/v1")

    def url(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{self.scheme}://{host}:{self.port}{self.path}"


class DnsDiscovery:
    """Keeps a pool's members equal to the URLs of the addresses a name resolves to."""

    def __init__(
        self,
        target: DnsTarget,
        set_members: Callable[[list[str]], object],
        *,
        interval: float,
        resolver: Resolver = system_resolver,
        min_gap: float = 0.5,
        timeout: float = 5.0,
    ) -> None:
        self.target = target
        self._set_members = set_members
        self.interval = interval
        self.resolver = resolver
        self.min_gap = min_gap  # at most one lookup this often, however many connects fail
        self.timeout = timeout
        self.members: list[str] | None = None  # None until the first answer
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last = 0.0

    async def refresh(self) -> list[str] | None:
        """Resolve once and update the pool if the answer changed; the members after it."""
        self._last = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                addresses = await self.resolver(self.target.host, self.target.port)
        except socket.gaierror as e:
            if e.errno not in NO_SUCH_NAME:
                return self._keep(e)
            addresses = []
        except (OSError, TimeoutError) as e:
            return self._keep(e)
        urls = sorted({self.target.url(a) for a in addresses})
        if urls != self.members:
            if not urls:
                log.warning("upstream DNS %s: no address (no ready replica)", self.target.host)
            self._set_members(urls)
            self.members = urls
        return self.members

    def _keep(self, error: BaseException) -> list[str] | None:
        log.warning("upstream DNS %s: %r (keeping the current members)", self.target.host, error)
        return self.members

    def connect_failed(self) -> None:
        """A connect to an upstream failed: look the name up again soon (replica gone?)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.sleep(max(0.0, self._last + self.min_gap - time.monotonic()))
            await self.refresh()

    async def start(self) -> None:
        """The first lookup (the pool starts with its answer, or empty while the name does not
        resolve), then the refresh loop."""
        if await self.refresh() is None:
            self._set_members([])
            self.members = []
        self._task = asyncio.create_task(self._run(), name="upstream-dns")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
