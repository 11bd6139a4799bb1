"""The vLLM servers behind the gateway: least-in-flight choice, failover before the request
reaches one, and the :class:`Lease` a request holds on the upstream it got."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.metrics import Metrics
from gateway.protocol import GatewayError
from gateway.settings import Settings
from gateway.transport import (
    ConnectError,
    ConnectTimeout,
    Disconnected,
    ReadTimeout,
    Response,
    Transport,
)

DOWN_FOR_S = 1.0  # after a failed connect, try the others first for this long


class Upstream:
    """One OpenAI-compatible server: its transport and the requests it serves now."""

    def __init__(self, base_url: str, settings: Settings) -> None:
        self.base_url = base_url
        self.in_flight = 0
        self.down_until = 0.0
        headers = {}
        if settings.upstream_api_key is not None:
            headers["authorization"] = "Bearer " + settings.upstream_api_key.get_secret_value()
        self.transport = Transport(
            base_url,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.first_byte_timeout,
            max_connections=settings.upstream_max_connections,
            headers=headers,
        )

    async def aclose(self) -> None:
        await self.transport.aclose()

    def __repr__(self) -> str:
        return f"Upstream({self.base_url}, in_flight={self.in_flight})"


def no_answer(e: ReadTimeout | Disconnected) -> GatewayError:
    """A request that reached the upstream and got no whole answer: 504 for silence, 502 for a
    closed connection (never re-sent; ``reason`` is what the caller counts)."""
    if isinstance(e, ReadTimeout):
        return GatewayError(
            504, "the model server sent no response in time",
            code="upstream_timeout", reason="first_byte_timeout",
        )  # fmt: skip
    return GatewayError(
        502, "the model server closed the connection without answering in full",
        code="upstream_closed", reason="closed",
    )  # fmt: skip


class Lease:
    """A request's hold on one upstream, counted in its ``in_flight`` from the moment it is
    chosen until :meth:`end` (which is idempotent: a lease cannot be released twice)."""

    __slots__ = ("_ended", "response", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.response: Response | None = None
        self._ended = False
        upstream.in_flight += 1

    def chunks(self) -> Any:
        assert self.response is not None
        return self.response.chunks()

    async def read(self) -> bytes:
        """The whole body; the lease ends either way (an unfinished read aborts)."""
        assert self.response is not None
        try:
            return await self.response.read()
        except (ReadTimeout, Disconnected) as e:
            raise no_answer(e) from None
        finally:
            self.end()

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.upstream.in_flight -= 1
            if self.response is not None:
                self.response.end()


class UpstreamPool:
    """Picks the upstream with the fewest requests in flight; a failed connect moves on."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        # with GATEWAY_UPSTREAMS_DNS the members come from discovery (gateway/discovery.py)
        urls = [] if settings.upstreams_dns else settings.upstreams
        self.upstreams = [Upstream(url, settings) for url in urls]
        self.metrics = metrics
        self._turn = 0
        self._retiring: set[asyncio.Task] = set()
        # told of every failed connect (discovery then looks the name up again soon)
        self.on_connect_error: Callable[[], None] | None = None

    def set_members(self, urls: list[str]) -> None:
        """Serve exactly ``urls`` from now on: new ones join, removed ones take no new request
        and close once the requests they serve have finished."""
        wanted = [url.rstrip("/") for url in urls]
        current = {up.base_url: up for up in self.upstreams}
        self.upstreams = [current.get(url) or Upstream(url, self.settings) for url in wanted]
        for url, up in current.items():
            if url not in wanted:
                task = asyncio.get_running_loop().create_task(self._retire(up))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(up: Upstream, poll_s: float = 0.5) -> None:
        while up.in_flight > 0:
            await asyncio.sleep(poll_s)
        await up.aclose()

    def pick(self, tried: list[Upstream]) -> Upstream | None:
        """The next upstream to try: up before down, then fewest in flight, ties rotated."""
        ups = self.upstreams
        if not ups:
            return None
        if len(ups) == 1:
            return None if tried else ups[0]
        self._turn = (self._turn + 1) % len(ups)
        now = time.monotonic()
        best = None
        best_key = None
        for i in range(len(ups)):
            up = ups[(self._turn + i) % len(ups)]
            if up in tried:
                continue
            key = (up.down_until > now, up.in_flight)
            if best_key is None or key < best_key:
                best, best_key = up, key
        return best

    async def open(self, body: bytes) -> Lease:
        """Send a chat request; return the lease on the upstream that answered (head read).

        A failed connect is tried on the next upstream. Once the request has reached an
        upstream nothing is re-sent: a close before the answer is 502, silence is 504.
        """
        timeouts = 0
        tried: list[Upstream] = []
        while (up := self.pick(tried)) is not None:
            tried.append(up)
            lease = Lease(up)
            try:
                lease.response = await up.transport.request("POST", "/chat/completions", body)
                return lease
            except ConnectError as e:
                lease.end()
                timeouts += isinstance(e, ConnectTimeout)
                self._connect_failed(
                    up, "connect_timeout" if isinstance(e, ConnectTimeout) else "connect"
                )
            except (ReadTimeout, Disconnected) as e:
                lease.end()
                raise no_answer(e) from None
            except BaseException:
                lease.end()
                raise
        if timeouts:
            raise GatewayError(
                504, "connecting to the model servers timed out", code="upstream_timeout"
            )
        raise GatewayError(503, "no model server is reachable", code="upstream_unavailable")

    def _connect_failed(self, up: Upstream, reason: str) -> None:
        up.down_until = time.monotonic() + DOWN_FOR_S
        self.metrics.upstream_errors.labels(reason).inc()
        if self.on_connect_error is not None:
            self.on_connect_error()

    async def _get_json(self, up: Upstream, path: str, timeout: float) -> Any:
        response = await up.transport.request("GET", path, timeout=timeout)
        try:
            raw = await response.read()
        finally:
            response.end()
        if response.status != 200:
            raise GatewayError(502, f"{path} answered {response.status}")
        return orjson.loads(raw)

    async def list_models(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The union of the upstreams' ``/models`` lists (unreachable ones are skipped)."""
        results = await asyncio.gather(
            *(self._get_json(up, "/models", timeout) for up in self.upstreams),
            return_exceptions=True,
        )
        seen: dict[str, dict[str, Any]] = {}
        answered = False
        for result in results:
            if isinstance(result, BaseException) or not isinstance(result, dict):
                continue
            answered = True
            for model in result.get("data") or []:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    seen.setdefault(model["id"], model)
        if not answered:
            raise GatewayError(503, "no model server is reachable", code="upstream_unavailable")
        return list(seen.values())

    async def aclose(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(up.aclose() for up in self.upstreams))
