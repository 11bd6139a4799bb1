"""The vLLM servers behind the gateway: least-in-flight choice, retries before the first byte.

The upstream client is :mod:`gateway.httpclient` (asyncio + httptools, one keep-alive pool
per upstream): on this project's 2-core benchmark machine a round trip to a stub costs
~0.08 ms with it, ~0.21 ms with aiohttp and ~0.7 ms with httpx, against a gateway overhead
budget of 0.3 ms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.httpclient import (
    ConnectError,
    ConnectTimeout,
    Disconnected,
    Pool,
    ReadTimeout,
    Response,
    UpstreamError,
)
from gateway.metrics import Metrics
from gateway.protocol import GatewayError
from gateway.settings import Settings

DOWN_FOR_S = 1.0  # after a failed connect, try the others first for this long
# Idle pooled connections are dropped before the server drops them (uvicorn, and so vLLM,
# closes idle keep-alive connections after 5 s).
KEEPALIVE_S = 4.0
JSON = "application/json"


class Upstream:
    """One OpenAI-compatible server and its keep-alive connection pool."""

    def __init__(self, base_url: str, settings: Settings) -> None:
        self.base_url = base_url
        self.in_flight = 0
        self.down_until = 0.0
        headers = {}
        if settings.upstream_api_key is not None:
            secret = settings.upstream_api_key.get_secret_value()
            headers["authorization"] = "Bearer " + secret
        self.pool = Pool(
            base_url,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.first_byte_timeout,
            keepalive_s=KEEPALIVE_S,
            headers=headers,
        )

    async def aclose(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        return f"Upstream({self.base_url}, in_flight={self.in_flight})"


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

    async def open(self, body: bytes) -> tuple[Upstream, Response]:
        """Send a chat request; return the upstream and its response, headers read, body not.

        The caller owns the result: it must ``close()``/``release()`` the response and
        decrement ``upstream.in_flight``. Connect failures are retried on the next upstream;
        nothing is retried once the upstream has answered.
        """
        timeouts = 0
        tried: list[Upstream] = []
        stale_retry = True
        while (up := self.pick(tried)) is not None:
            tried.append(up)
            up.in_flight += 1
            try:
                response = await up.pool.request("POST", "/chat/completions", body, JSON)
                return up, response
            except ConnectTimeout:
                reason = "connect_timeout"
                timeouts += 1
            except ConnectError:
                reason = "connect"
            except Disconnected as e:
                up.in_flight -= 1
                if e.reused and stale_retry:  # a pooled connection the server had closed
                    stale_retry = False  # once more, on a fresh connection
                    tried.remove(up)
                    continue
                up.in_flight += 1
                reason = "connect"
            except ReadTimeout:
                up.in_flight -= 1
                self.metrics.upstream_errors.labels("first_byte_timeout").inc()
                raise GatewayError(
                    504, "the model server sent no response in time", code="upstream_timeout"
                ) from None
            except UpstreamError:
                reason = "closed"
            except BaseException:
                up.in_flight -= 1
                raise
            up.in_flight -= 1
            up.down_until = time.monotonic() + DOWN_FOR_S
            self.metrics.upstream_errors.labels(reason).inc()
            if self.on_connect_error is not None:
                self.on_connect_error()
        if timeouts:
            raise GatewayError(
                504, "connecting to the model servers timed out", code="upstream_timeout"
            )
        raise GatewayError(503, "no model server is reachable", code="upstream_unavailable")

    async def _get_json(self, up: Upstream, path: str, timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            response = await up.pool.request("GET", path)
            try:
                raw = await response.read()
            except BaseException:
                response.close()
                raise
            response.release()
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
