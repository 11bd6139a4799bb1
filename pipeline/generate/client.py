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
import functools
import random
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import openai
import orjson

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


def _retry_after(headers: httpx2.Headers | None) -> float | None:
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


def _event(data: bytes, parts: dict[str, list[str]], meta: dict[str, Any]) -> bool:
    """Fold one server-sent event's data into the answer; True at ``[DONE]``.

    Raises ValueError on a body that is not a chunk (the caller retries it as broken).
    """
    if data == b"[DONE]":
        return True
    chunk = orjson.loads(data)
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


def parse_sse(body: bytes) -> dict[str, Any]:
    """A whole streamed chat completion (server-sent events) folded into the raw answer fields.

    Lines end in LF, CRLF or CR; comments (``: keep-alive``), ``event:``/``id:`` fields and
    anything after ``[DONE]`` are ignored; an event's ``data:`` lines are joined by newlines.
    """
    parts: dict[str, list[str]] = {"content": [], "reasoning_content": [], "reasoning": []}
    meta: dict[str, Any] = {"finish": None, "usage": None, "model": None}
    data: list[bytes] = []
    for line in body.splitlines():
        if line:
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            continue
        if data and _event(b"\n".join(data), parts, meta):
            break
        data = []
    else:
        if data:
            _event(b"\n".join(data), parts, meta)
    return {
        "content": "".join(parts["content"]),
        "reasoning_content": "".join(parts["reasoning_content"]) or None,
        "reasoning": "".join(parts["reasoning"]) or None,
        "finish_reason": meta["finish"],
        "usage": _usage_dict(meta["usage"]),
        "model": meta["model"],
    }


def _extra(obj: Any, name: str) -> str | None:
    value = getattr(obj, name, None)
    return value if isinstance(value, str) else None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one TLS context with the usual trust store (building one costs tens of
    ms of CPU; worker processes inherit it when it was built before they forked)."""
    return httpx2.create_ssl_context()


# For plain-http endpoints: a verifying context that trusts nothing, so a redirect to https
# fails instead of going unverified, without paying for loading the trust store.
_NO_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class TeacherClient:
    """One reused ``AsyncOpenAI`` client per endpoint, its connection pool sized to the
    endpoint's limit.

    The SDK runs on its aiohttp transport (``openai.DefaultAioHttpClient``): aiohttp's
    connection pool and C HTTP parser cost about half the client CPU per request of the
    default httpx transport (measured), and its pool does not slow down with thousands of
    connections, so one client serves the whole endpoint.
    """

    def __init__(self, spec: TeacherSpec, *, timeout: float = 600.0, stream: bool = True):
        self.spec = spec
        self.stream = stream if spec.stream is None else spec.stream
        self.options = spec.request_options()
        key = self._key = spec.api_key()
        size = spec.max_concurrency
        to = httpx2.Timeout(timeout, connect=min(timeout, 30.0))
        https = spec.base_url.lower().startswith("https:")
        self.sdk = openai.AsyncOpenAI(
            base_url=spec.base_url,
            api_key=key,
            max_retries=0,
            timeout=to,
            http_client=openai.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=size, max_keepalive_connections=size),
                timeout=to,
                verify=tls_context() if https else _NO_TLS,
            ),
        )

    async def aclose(self) -> None:
        await self.sdk.close()

    async def complete(
        self, messages: list[dict[str, str]], params: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        """One attempt. Returns the raw response fields; raises Retryable/FatalError."""
        try:
            if self.stream:
                raw = await self._streamed(messages, params, seed)
            else:
                raw = await self._whole(messages, params, seed)
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
        except (openai.APITimeoutError, httpx2.TimeoutException, TimeoutError):
            raise RetryableError("timeout") from None
        except (openai.APIConnectionError, httpx2.TransportError, aiohttp.ClientError, OSError):
            # aiohttp errors the SDK's transport adapter does not map (a malformed response)
            raise RetryableError("connection") from None
        except (openai.APIError, httpx2.HTTPError, ValueError):
            raise RetryableError("broken_body") from None
        empty = not (raw["content"] or raw["reasoning_content"] or raw["reasoning"])
        if empty and raw["finish_reason"] != "length":
            raise RetryableError("empty_body")
        return raw

    def _create(
        self,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        seed: int,
        raw: bool = False,
        streaming: bool = False,
        **kw: Any,
    ):
        # The model, the messages (plain role/content strings) and the sampling parameters
        # travel in ``extra_body``, which the SDK merges into the JSON body it sends: given as
        # arguments, the SDK walks them against its TypedDicts on every call (the model's
        # type alone is a Literal of every OpenAI model name, hashed on each lookup), which
        # was measured at about a fifth of the client's CPU per request. The request body
        # is the same JSON either way.
        completions = self.sdk.chat.completions
        if streaming:
            create = completions.with_streaming_response.create
        else:
            create = completions.with_raw_response.create if raw else completions.create
        stream = kw.pop("stream", openai.omit)
        body = {
            "model": self.spec.model,
            "messages": messages,
            "seed": seed,
            **params,
            **self.options,
            **kw,
        }
        return create(model=openai.omit, messages=[], stream=stream, extra_body=body)  # type: ignore[arg-type]

    async def _streamed(
        self, messages: list[dict[str, str]], params: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        """A streamed answer: the SDK builds, authenticates and sends the request and raises
        its usual errors on a failed status; the body is read to its end (which keeps the
        connection reusable) and its events are decoded here as plain JSON rather than into
        the SDK's pydantic chunk models, which cost more client CPU than the rest of a request
        (measured)."""
        ctx = self._create(
            messages,
            params,
            seed,
            streaming=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with ctx as response:
            body = await response.read()
        return parse_sse(body)

    async def _whole(
        self, messages: list[dict[str, str]], params: dict[str, Any], seed: int
    ) -> dict[str, Any]:
        raw = await self._create(messages, params, seed, raw=True)
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
