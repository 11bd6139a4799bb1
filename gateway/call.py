"""One chat request's hold on the gateway's shared resources, from arrival to its log line.

``async with Call(gw, key, rid) as call`` counts the request in flight; :meth:`Call.admit`
takes a slot of the key's limits; :meth:`Call.lease` opens an upstream request. All of it is
given back by :meth:`Call.close`, which runs once (the first call wins, ``__aexit__`` calls
it too) and records the request: no path can leak a slot or count a request twice.
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from gateway.auth import KeyState
from gateway.modes import Outcome
from gateway.state import Gateway
from gateway.upstreams import Lease

log = logging.getLogger("gateway")


class Call:
    """One chat request as the limits, the upstreams, the metrics and the access log see it."""

    __slots__ = (
        "_admitted",
        "_leases",
        "closed",
        "elapsed",
        "gw",
        "key",
        "mode",
        "model",
        "outcome",
        "rid",
        "stream",
        "t0",
        "upstream_wait",
    )  # fmt: skip

    def __init__(self, gw: Gateway, key: KeyState, rid: str) -> None:
        self.gw = gw
        self.key = key
        self.rid = rid
        self.t0 = time.perf_counter()
        self.model: str | None = None
        self.mode: str | None = None
        self.stream = False
        self.upstream_wait = 0.0  # seconds spent waiting on the upstream (not overhead)
        self.elapsed: float | None = None  # arrival to response, once the response is ready
        self.outcome: Outcome | None = None
        self.closed = False
        self._admitted = False
        self._leases: list[Lease] = []

    async def __aenter__(self) -> Call:
        self.gw.metrics.in_flight_now += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not self.closed:
            log.error("chat request %s failed", self.rid, exc_info=(exc_type, exc, tb))  # type: ignore[arg-type]
            self.close(500, "internal")
        # a response that never finished (the client left mid-stream): 499
        self.close(499, "client_disconnected")

    def admit(self) -> None:
        """Take a slot of the key's rate and concurrency limits (429 when there is none)."""
        self.key.take(time.monotonic())
        self._admitted = True

    async def lease(self, body: bytes) -> Lease:
        """Send ``body`` to an upstream; the lease is this call's until it ends or closes."""
        lease = await self.gw.pool.open(body)
        self._leases.append(lease)
        if self.closed:  # closed while the upstream was answering: give it back now
            lease.end()
        return lease

    def respond(self) -> None:
        """The response is ready: stop the clock (sending it is not the gateway's time)."""
        self.elapsed = time.perf_counter() - self.t0

    def close(self, status: int, error: str | None = None) -> None:
        """Give everything back and record the request; only the first call counts."""
        if self.closed:
            return
        self.closed = True
        for lease in self._leases:
            lease.end()
        if self._admitted:
            self.key.release()
        self.gw.metrics.in_flight_now -= 1
        elapsed = self.elapsed if self.elapsed is not None else time.perf_counter() - self.t0
        self.gw.record(
            rid=self.rid, key=self.key, model=self.model, mode=self.mode, stream=self.stream,
            status=status, elapsed=elapsed, upstream_wait=self.upstream_wait,
            outcome=self.outcome, error=error,
        )  # fmt: skip
