"""One teacher call: the official async ``openai`` SDK, streaming by default, own retry policy.

The SDK's own retries are off (``max_retries=0``): :func:`call_with_retries` retries 429, 5xx,
timeouts, dropped connections, broken and empty bodies with exponential backoff and full
jitter, never sooner than the server's ``Retry-After``. A ``finish_reason == "length"``
answer is returned, not retried (paying again for the same long reasoning rarely helps); the
normaliser rejects it as ``truncated``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import openai

from pipeline.generate.teachers import EndpointPool, TeacherSpec

FATAL_STATUS = {400, 401, 403, 404, 405, 413, 422}


class RetryableError(Exception):
    """A failed attempt worth retrying; ``reason`` is short and safe to store."""

    def __init__(self, reason: str, retry_after: float | None = None, throttled: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.throttled = throttled


class FatalError(Exception):
    """A failure no retry can fix (bad request, wrong key, unknown model)."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 1.0
    cap_s: float = 60.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff for attempt ``attempt`` (0-based), >= Retry-After."""
        backoff = random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))
        return max(backoff, retry_after or 0.0)


def _retry_after(headers: httpx.Headers | None) -> float | None:
    if headers is None:
        return None
    if ms := headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP date
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _usage(usage: Any) -> dict[str, int] | None:
    if usage is None:
        return None
    details = getattr(usage, "completion_tokens_details", None)
    reasoning = getattr(details, "reasoning_tokens", None) if details else None
    out = {
        "prompt_tokens": usage.prompt_tokens or 0,
        "completion_tokens": usage.completion_tokens or 0,
    }
    if reasoning is not None:
        out["reasoning_tokens"] = reasoning
    return out


def _usage_dict(usage: dict[str, Any] | None) -> dict[str, int] | None:
    """:func:`_usage` for a usage object decoded as plain JSON."""
    if not isinstance(usage, dict):
        return None
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    out = {
        "prompt_tokens": usage.get("prompt_tokens") or 0,
        "completion_tokens": usage.get("completion_tokens") or 0,
    }
    if reasoning is not None:
        out["reasoning_tokens"] = reasoning
    return out


def _event(data: str, parts: dict[str, list[str]], meta: dict[str, Any]) -> bool:
    """Fold one server-sent event into the answer; True at ``[DONE]``.

    Raises ValueError on a body that is not a chunk (the caller retries it as broken).
    """
    if data == "[DONE]":
        return True
    chunk = json.loads(data)
    if not isinstance(chunk, dict) or chunk.get("error") is not None:
        raise ValueError("not a chat completion chunk")
    meta["model"] = meta["model"] or chunk.get("model")
    if chunk.get("usage") is not None:
        meta["usage"] = chunk["usage"]
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for name, bucket in parts.items():
                piece = delta.get(name)
                if piece and isinstance(piece, str):
                    bucket.append(piece)
        if choice.get("finish_reason"):
            meta["finish"] = choice["finish_reason"]
    return False


def _extra(obj: Any, name: str) -> str | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, str) else None


SHARD_SIZE = 8


class TeacherClient:
    """Reused ``AsyncOpenAI`` clients for one endpoint, their connections sized to its limit.

    httpx's connection pool scans every connection on each request, so one pool of 2,000
    connections costs O(n) per request; the endpoint's connections are split into shards of
    at most ``SHARD_SIZE`` and each request goes to the least busy shard.
    """

    def __init__(self, spec: TeacherSpec, *, timeout: float = 600.0, stream: bool = True):
        self.spec = spec
        self.stream = stream
        n = -(-spec.max_concurrency // SHARD_SIZE)
        size = -(-spec.max_concurrency // n)
        key = self._key = spec.api_key()
        to = httpx.Timeout(timeout, connect=min(timeout, 30.0))
        tls = httpx.create_ssl_context()  # one TLS context for all shards (building one is slow)
        self.shards = [
            openai.AsyncOpenAI(
                base_url=spec.base_url,
                api_key=key,
                max_retries=0,
                timeout=to,
                http_client=httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=size, max_keepalive_connections=size),
                    timeout=to,
                    verify=tls,
                ),
            )
            for _ in range(n)
        ]
        self.busy = [0] * n

    async def aclose(self) -> None:
        for shard in self.shards:
            await shard.close()

    async def complete(
        self, messages: list[dict[str, str]], params: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        """One attempt. Returns the raw response fields; raises Retryable/FatalError."""
        shard = min(range(len(self.shards)), key=self.busy.__getitem__)
        self.busy[shard] += 1
        try:
            return await self._attempt(self.shards[shard], messages, params, seed)
        finally:
            self.busy[shard] -= 1

    async def _attempt(
        self,
        sdk: openai.AsyncOpenAI,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        seed: int,
    ) -> dict[str, Any]:
        try:
            if self.stream:
                raw = await self._streamed(sdk, messages, params, seed)
            else:
                raw = await self._whole(sdk, messages, params, seed)
        except openai.APIStatusError as e:
            code = e.status_code
            if code == 429:
                raise RetryableError("http_429", _retry_after(e.response.headers), True) from None
            if code in FATAL_STATUS:
                detail = str(e.message).replace(self._key, "***")[:300]
                raise FatalError(
                    f"teacher {self.spec.name!r} ({self.spec.base_url}) answered HTTP {code}: "
                    f"{detail}"
                ) from None
            raise RetryableError(f"http_{code}", _retry_after(e.response.headers)) from None
        except (openai.APITimeoutError, httpx.TimeoutException):
            raise RetryableError("timeout") from None
        except (openai.APIConnectionError, httpx.TransportError):
            raise RetryableError("connection") from None
        except (openai.APIError, json.JSONDecodeError, ValueError):
            raise RetryableError("broken_body") from None
        empty = not (raw["content"] or raw["reasoning_content"] or raw["reasoning"])
        if empty and raw["finish_reason"] != "length":
            raise RetryableError("empty_body")
        return raw

    def _create(
        self,
        sdk: openai.AsyncOpenAI,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        seed: int,
        raw: bool = False,
        streaming: bool = False,
        **kw: Any,
    ):
        # The messages (plain role/content strings) and the sampling parameters travel in
        # ``extra_body``, which replaces the empty placeholder: the SDK otherwise walks them
        # against its TypedDicts on every call (~0.8 ms CPU per request for the messages alone,
        # measured), a quarter of the client's cost at 2,000 in flight. The request body is
        # the same JSON either way.
        completions = sdk.chat.completions
        if streaming:
            create = completions.with_streaming_response.create
        else:
            create = completions.with_raw_response.create if raw else completions.create
        stream = kw.pop("stream", openai.NOT_GIVEN)
        return create(
            model=self.spec.model,
            messages=[],
            stream=stream,
            extra_body={"messages": messages, "seed": seed, **params, **kw},
        )

    async def _streamed(
        self,
        sdk: openai.AsyncOpenAI,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        seed: int,
    ) -> dict[str, Any]:
        """A streamed answer, its server-sent events read from the SDK's streaming response.

        The SDK still builds, authenticates and sends the request and raises its usual
        errors on a failed status; the events are decoded here as plain JSON rather than
        into the SDK's pydantic chunk models, which cost more client CPU than the rest of a
        request (measured), so one process keeps up with thousands of requests in flight.
        """
        parts: dict[str, list[str]] = {"content": [], "reasoning_content": [], "reasoning": []}
        meta: dict[str, Any] = {"finish": None, "usage": None, "model": None}
        ctx = self._create(
            sdk,
            messages,
            params,
            seed,
            streaming=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with ctx as response:
            data: list[str] = []
            done = False
            # read to the end even after [DONE]: a fully read response keeps its connection
            async for line in response.iter_lines():
                if line:
                    if line.startswith("data:") and not done:
                        data.append(line[6:] if line.startswith("data: ") else line[5:])
                    continue  # comments (": keep-alive"), event:/id: fields
                if data:
                    done = _event("\n".join(data), parts, meta)
                data = []
            if data:
                _event("\n".join(data), parts, meta)
        return {
            "content": "".join(parts["content"]),
            "reasoning_content": "".join(parts["reasoning_content"]) or None,
            "reasoning": "".join(parts["reasoning"]) or None,
            "finish_reason": meta["finish"],
            "usage": _usage_dict(meta["usage"]),
            "model": meta["model"],
        }

    async def _whole(
        self,
        sdk: openai.AsyncOpenAI,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        seed: int,
    ) -> dict[str, Any]:
        raw = await self._create(sdk, messages, params, seed, raw=True)
        if not raw.http_response.content.strip():
            raise RetryableError("empty_body")
        resp = raw.parse()
        if not isinstance(resp, openai.types.chat.ChatCompletion) or not resp.choices:
            raise RetryableError("empty_body")
        choice = resp.choices[0]
        msg = choice.message
        return {
            "content": msg.content or "",
            "reasoning_content": _extra(msg, "reasoning_content"),
            "reasoning": _extra(msg, "reasoning"),
            "finish_reason": choice.finish_reason,
            "usage": _usage(resp.usage),
            "model": resp.model,
        }


@dataclass
class CallResult:
    """What one logical request ended as: a response, or the last failure after all retries."""

    raw: dict[str, Any]
    ok: bool
    endpoint: str | None
    attempts: int


async def call_with_retries(
    pool: EndpointPool,
    messages: list[dict[str, str]],
    params: dict[str, Any],
    seed: int,
    policy: RetryPolicy,
    on_retry=None,
) -> CallResult:
    """Send one request through the pool until it gets a response or retries run out."""
    last = "request_failed"
    for attempt in range(policy.max_attempts):
        async with pool.slot() as slot:
            client: TeacherClient = slot.endpoint.client  # type: ignore[assignment]
            try:
                raw = await client.complete(messages, params, seed)
            except RetryableError as e:
                slot.throttled = e.throttled
                last, retry_after = e.reason, e.retry_after
            else:
                usage = raw.get("usage") or {}
                slot.tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
                return CallResult(raw, True, slot.endpoint.name, attempt + 1)
        if attempt + 1 < policy.max_attempts:
            if on_retry is not None:
                on_retry(last)
            await asyncio.sleep(policy.delay(attempt, retry_after))
    reason = "empty_body" if last == "empty_body" else "request_failed"
    return CallResult(
        {
            "error": f"gave up after {policy.max_attempts} attempts; last: {last}",
            "error_reason": reason,
        },
        False,
        None,
        policy.max_attempts,
    )
