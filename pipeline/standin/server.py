"""The stand-in's HTTP side: a raw ASGI app that speaks OpenAI chat completions.

Kept deliberately lean (no framework, orjson, one write per response, cached reasoning) so
one process on one core can hold thousands of slow streaming requests in flight.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from distill_common.think import THINK_CLOSE, THINK_OPEN, format_answer
from pipeline.standin.faults import FaultPlan, request_key
from pipeline.standin.persona import Persona, headline_of

FORMATS = ("reasoning_content", "reasoning", "inline", "inline-no-open")
FINGERPRINT = "fp_standin"
_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def estimate_tokens(text: str) -> int:
    """A cheap token count: one per CJK character, about one per three ASCII characters."""
    return (len(text.encode()) + 2) // 3


def _cut_to_tokens(text: str, budget: int) -> str:
    """The longest prefix of ``text`` whose token estimate fits ``budget``."""
    used = 0
    for i, ch in enumerate(text):
        used += len(ch.encode())
        if (used + 2) // 3 > budget:
            return text[:i]
    return text


@dataclass(frozen=True)
class Reply:
    """What the assistant message carries, already in the server's reasoning shape."""

    reasoning: str | None  # value of the reasoning field; None for the inline shapes
    content: str
    finish_reason: str
    reasoning_tokens: int


class ApiError(Exception):
    """An error answered in OpenAI's error JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.type, self.param, self.code = type_, param, code
        self.key: str | None = None  # the request key, when the body was a JSON object

    def body(self) -> bytes:
        """The JSON body OpenAI clients expect for an error."""
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class RequestLog:
    """JSONL log of every chat request received; each row is one unbuffered append."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        os.write(self._fd, orjson.dumps(row) + b"\n")

    def close(self) -> None:
        os.close(self._fd)


def _text(content: Any) -> str:
    """The text of a message's content (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _halves(text: str) -> list[str]:
    """Split text after its first line of substance (an opening tag alone does not count)."""
    start = len(THINK_OPEN) + 1 if text.startswith(THINK_OPEN + "\n") else 0
    cut = text.find("\n", start) + 1
    return [text[:cut], text[cut:]] if 0 < cut < len(text) else [text]


def _pieces(text: str) -> list[str]:
    """A few stream deltas for a text: the first line, the rest of the reasoning, and the
    ``</think>`` + answer tail, so tags never straddle deltas. Few deltas keep clients cheap."""
    cut = text.find(THINK_CLOSE)
    if cut <= 0:
        return _halves(text)
    return [*_halves(text[:cut]), text[cut:]]


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    body: dict[str, Any]
    key: str
    headline: str
    stream: bool
    include_usage: bool
    variant: int | None
    max_tokens: int | None
    prompt_tokens: int


class StandinApp:
    """ASGI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``."""

    def __init__(
        self,
        persona: Persona,
        faults: FaultPlan,
        *,
        model: str,
        reasoning_format: str = "reasoning_content",
        latency_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        log: RequestLog | None = None,
    ) -> None:
        if reasoning_format not in FORMATS:
            raise ValueError(f"reasoning_format must be one of {FORMATS}, not {reasoning_format!r}")
        self.persona, self.faults, self.model = persona, faults, model
        self.format = reasoning_format
        self.latency, self.chunk_delay = latency_s, chunk_delay_s
        self.log = log
        self.attempts: dict[str, int] = {}
        self.started = int(time.time())
        ra = faults.retry_after
        self._retry_after = str(int(ra) if ra == int(ra) else ra).encode()

    # ---- ASGI plumbing -------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if path in ("/v1/chat/completions", "/chat/completions"):
                if method != "POST":
                    return await self._error(send, ApiError(405, "use POST"))
                return await self._chat(receive, send)
            if method != "GET":
                return await self._error(send, ApiError(405, f"use GET for {path}"))
            if path in ("/v1/models", "/models"):
                data = [
                    {
                        "id": self.model,
                        "object": "model",
                        "created": self.started,
                        "owned_by": "standin",
                    }
                ]
                return await self._json(send, 200, orjson.dumps({"object": "list", "data": data}))
            if path == "/health":
                return await self._json(send, 200, b'{"status":"ok"}')
            return await self._error(send, ApiError(404, f"no route {path}", code="not_found"))
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.log:
                        self.log.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    @staticmethod
    async def _json(send: Any, status: int, body: bytes, extra: list | None = None) -> None:
        headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _error(self, send: Any, err: ApiError, extra: list | None = None) -> None:
        await self._json(send, err.status, err.body(), extra)

    @staticmethod
    async def _read(receive: Any) -> bytes:
        message = await receive()
        body = message.get("body", b"")
        if not message.get("more_body"):
            return body
        parts = [body]
        while message.get("more_body"):
            message = await receive()
            parts.append(message.get("body", b""))
        return b"".join(parts)

    # ---- chat completions ----------------------------------------------------------------
    def _parse(self, raw: bytes) -> ChatRequest:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        key = request_key(body)
        try:
            return self._validate(body, key)
        except ApiError as e:
            e.key = key
            raise

    def _validate(self, body: dict, key: str) -> ChatRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required", param="model")
        if model != self.model:
            raise ApiError(
                404,
                f"The model `{model}` does not exist (this server has `{self.model}`)",
                param="model",
                code="model_not_found",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise ApiError(400, "each message must be an object with a 'role'", param="messages")
        users = [m for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError(400, "'messages' has no user message", param="messages")
        if body.get("n", 1) not in (1, None):
            raise ApiError(
                400,
                "n > 1 is not supported by the stand-in",
                param="n",
                code="unsupported_parameter",
            )
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        temperature = body.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        if not isinstance(temperature, int | float):
            raise ApiError(400, "'temperature' must be a number", param="temperature")
        seed = body.get("seed")
        stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        return ChatRequest(
            body=body,
            key=key,
            headline=headline_of(_text(users[-1].get("content"))),
            stream=stream,
            include_usage=stream
            and isinstance(options, dict)
            and bool(options.get("include_usage")),
            variant=seed if isinstance(seed, int) and temperature > 0 else None,
            max_tokens=max_tokens,
            prompt_tokens=sum(estimate_tokens(_text(m.get("content"))) + 4 for m in messages),
        )

    async def _chat(self, receive: Any, send: Any) -> None:
        raw = await self._read(receive)
        try:
            req = self._parse(raw)
        except ApiError as e:
            self._log(e.key, None, None, e.status, None)
            return await self._error(send, e)
        attempt = self.attempts[req.key] = self.attempts.get(req.key, 0) + 1
        transport = self.faults.transport(req.key, attempt)
        content = self.faults.content(req.key) if transport in (None, "keepalive") else None
        fault = "+".join(f for f in (transport, content) if f) or None
        status = {"429": 429, "500": 500}.get(transport or "", 200)
        self._log(req.key, attempt, req, status, fault)

        if transport == "429":
            return await self._error(
                send,
                ApiError(
                    429,
                    "Rate limit reached for requests (stand-in fault injection)",
                    type_="rate_limit_error",
                    code="rate_limit_exceeded",
                ),
                [(b"retry-after", self._retry_after)],
            )
        started = False
        if transport == "keepalive":
            started = True
            headers = _SSE if req.stream else [_JSON]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            beat = b": keep-alive\n\n" if req.stream else b"\n"
            for _ in range(2):
                await send({"type": "http.response.body", "body": beat, "more_body": True})
                if self.latency:
                    await asyncio.sleep(self.latency / 2)
        elif self.latency:
            await asyncio.sleep(self.latency)

        if transport == "500":
            return await self._error(
                send,
                ApiError(
                    500,
                    "The server had an error while processing your request "
                    "(stand-in fault injection)",
                    type_="server_error",
                ),
            )
        if transport == "empty":
            if req.stream:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE})
                return await send({"type": "http.response.body", "body": b""})
            return await self._json(send, 200, b"")

        reply = self._reply(req, content)
        if req.stream:
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            return await self._stream(send, req, attempt, reply)
        body = orjson.dumps(self._completion(req, attempt, reply))
        if started:
            return await send({"type": "http.response.body", "body": body})
        return await self._json(send, 200, body)

    def _log(
        self,
        key: str | None,
        attempt: int | None,
        req: ChatRequest | None,
        status: int,
        fault: str | None,
    ) -> None:
        if self.log is None:
            return
        self.log.write(
            {
                "ts": time.time(),
                "key": key,
                "attempt": attempt,
                "stream": req.stream if req else None,
                "fault": fault,
                "status": status,
                "seed": req.body.get("seed") if req else None,
                "headline": req.headline if req else None,
            }
        )

    # ---- answer text ---------------------------------------------------------------------
    def _reply(self, req: ChatRequest, fault: str | None) -> Reply:
        final = self.persona.off_label(req.headline) if fault == "offlabel" else None
        thought = self.persona.think(req.headline, req.variant, final)
        reasoning, label = thought.reasoning, thought.label
        if fault == "truncate":
            frac = 0.3 + 0.4 * self.faults.variant(req.key, "cut", 1000) / 1000
            return self._truncated(reasoning[: max(1, int(len(reasoning) * frac))])
        if req.max_tokens:
            full = estimate_tokens(format_answer(reasoning, label))
            if full > req.max_tokens:
                return self._truncated(_cut_to_tokens(reasoning, req.max_tokens) or reasoning[:1])
        if fault == "broken":
            return self._broken(req.key, reasoning, label)
        return self._shape(reasoning, label)

    def _shape(self, reasoning: str, label: str) -> Reply:
        tokens = estimate_tokens(reasoning)
        if self.format in ("reasoning_content", "reasoning"):
            return Reply(reasoning, label, "stop", tokens)
        text = format_answer(reasoning, label)
        if self.format == "inline-no-open":
            text = text.removeprefix(THINK_OPEN + "\n")
        return Reply(None, text, "stop", tokens)

    def _truncated(self, partial: str) -> Reply:
        tokens = estimate_tokens(partial)
        if self.format in ("reasoning_content", "reasoning"):
            return Reply(partial, "", "length", tokens)
        opener = THINK_OPEN + "\n" if self.format == "inline" else ""
        return Reply(None, opener + partial, "length", tokens)

    def _broken(self, key: str, reasoning: str, label: str) -> Reply:
        """Malformed tags the way real servers and models get them wrong."""
        tokens = estimate_tokens(reasoning)
        mangled = format_answer(reasoning, label).replace(THINK_CLOSE, "</thnk>")
        if self.format in ("reasoning_content", "reasoning"):
            kind = self.faults.variant(key, "broken", 2)
            if kind == 0:  # the server failed to split, and the model misspelt the close tag
                return Reply(None, mangled, "stop", tokens)
            # the closing tag and answer leaked into the reasoning field
            return Reply(f"{reasoning}\n{THINK_CLOSE}\n\n{label}", "", "stop", tokens)
        kind = self.faults.variant(key, "broken", 3)
        if kind == 0:
            text = mangled
        elif kind == 1:  # a stray second opening tag inside the reasoning
            head, _, tail = reasoning.partition("\n")
            text = format_answer(f"{head}\n{THINK_OPEN}\n{tail}", label)
        else:  # the close tag is missing altogether
            text = f"{THINK_OPEN}\n{reasoning}\n\n{label}"
        if self.format == "inline-no-open":
            text = text.removeprefix(THINK_OPEN + "\n")
        return Reply(None, text, "stop", tokens)

    # ---- response bodies -----------------------------------------------------------------
    def _usage(self, req: ChatRequest, reply: Reply) -> dict[str, Any]:
        completion = estimate_tokens(reply.reasoning or "") + estimate_tokens(reply.content)
        return {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": req.prompt_tokens + completion,
            "completion_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
        }

    def _completion(self, req: ChatRequest, attempt: int, reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.reasoning is not None:
            message[self.format] = reply.reasoning
        return {
            "id": f"chatcmpl-{req.key}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": self._usage(req, reply),
        }

    def _events(self, req: ChatRequest, attempt: int, reply: Reply) -> list[bytes]:
        head = {
            "id": f"chatcmpl-{req.key}-{attempt}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }
        deltas: list[dict[str, Any]] = []
        if reply.reasoning:
            field = "reasoning" if self.format == "reasoning" else "reasoning_content"
            deltas += [{field: p} for p in _halves(reply.reasoning)]
        if reply.content:
            deltas += [{"content": p} for p in _pieces(reply.content)]
        if not deltas:
            deltas = [{"content": ""}]
        deltas[0] = {"role": "assistant", **deltas[0]}
        # as vLLM does, the last delta carries the finish reason (no extra empty chunk)
        last = len(deltas) - 1
        chunks = [
            {
                **head,
                "choices": [
                    {
                        "index": 0,
                        "delta": d,
                        "logprobs": None,
                        "finish_reason": reply.finish_reason if i == last else None,
                    }
                ],
            }
            for i, d in enumerate(deltas)
        ]
        if req.include_usage:
            chunks.append({**head, "choices": [], "usage": self._usage(req, reply)})
        return [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]

    async def _stream(self, send: Any, req: ChatRequest, attempt: int, reply: Reply) -> None:
        events = self._events(req, attempt, reply)
        if not self.chunk_delay:
            return await send({"type": "http.response.body", "body": b"".join(events)})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await asyncio.sleep(self.chunk_delay)
        await send({"type": "http.response.body", "body": b""})
