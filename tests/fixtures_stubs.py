"""Raw HTTP/1.1 stub upstreams (asyncio, stdlib only) for gateway robustness tests, where
the stand-in teacher cannot misbehave the way a test needs.

Each stub runs its own event loop in a thread and speaks just enough HTTP/1.1: it reads a
request head and a Content-Length (or chunked) body, and for ``POST …/chat/completions``
does what ``behaviour`` says:

- ``"ok"``: answers 200 for any model (JSON, or an SSE stream when ``"stream": true``),
  after ``delay`` seconds; keep-alive, and it never closes an idle connection itself.
- ``"close"``: reads the whole request, then closes the connection without a byte.
- ``"error"``: answers ``error_status`` with an OpenAI-shaped error whose message quotes
  the last user message (as real servers do in validation errors).

``GET …/models`` lists ``models`` (and closes the connection, so that chat requests always
arrive on fresh connections). The stub counts chat requests (``chat_requests``, the parsed
bodies; ``chat_headers``, their headers) and connections (``open_connections`` now,
``peak_connections`` at most). ``set_cookie`` adds a ``Set-Cookie`` header to its answers.

Usage::

    def test_x(stub_factory):
        stub = stub_factory("close")
        gw = gateway(upstreams=stub.base_url)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

STUB_MODEL = "stub-model"


class RequestHead:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


async def read_request(reader: asyncio.StreamReader) -> RequestHead | None:
    """One HTTP/1.1 request, or None at the end of the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    try:
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return RequestHead(method, path, headers, body)


def _response(
    status: int, body: bytes, content_type: str, *, close: bool = False, extra: str = ""
) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"content-type: {content_type}\r\n{extra}"
        f"content-length: {len(body)}\r\n"
        f"connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _last_user_text(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in reversed(messages or []):
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def completion(model: str, text: str = "stub answer") -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def sse_events(model: str, text: str = "stub answer") -> bytes:
    def chunk(delta: dict, finish: str | None) -> bytes:
        data = {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    return (
        chunk({"role": "assistant", "content": ""}, None)
        + chunk({"content": text}, None)
        + chunk({}, "stop")
        + b"data: [DONE]\n\n"
    )


class StubServer:
    """A raw HTTP upstream on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        behaviour: str = "ok",
        *,
        models: tuple[str, ...] = (STUB_MODEL,),
        delay: float = 0.0,
        error_status: int = 400,
        set_cookie: str | None = None,
    ) -> None:
        if behaviour not in ("ok", "close", "error"):
            raise ValueError(behaviour)
        self.behaviour, self.models, self.delay = behaviour, models, delay
        self.error_status = error_status
        self.chat_requests: list[Any] = []
        self.chat_headers: list[dict[str, str]] = []
        self._extra = f"set-cookie: {set_cookie}\r\n" if set_cookie else ""
        self.open_connections = 0
        self.peak_connections = 0
        self.total_connections = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stub-upstream")
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError("stub upstream did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.open_connections += 1
            self.total_connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
        self._writers.add(writer)
        try:
            while (request := await read_request(reader)) is not None:
                if not await self._answer(request, writer):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()
            with self._lock:
                self.open_connections -= 1

    async def _answer(self, request: RequestHead, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False: close the connection."""
        if request.method == "GET" and request.path.rstrip("/").endswith("/models"):
            data = {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
            writer.write(_response(200, json.dumps(data).encode(), "application/json", close=True))
            await writer.drain()
            return False
        if request.method == "GET" and request.path in ("/health", "/v1/health"):
            writer.write(_response(200, b"{}", "application/json"))
            await writer.drain()
            return True
        if not request.path.rstrip("/").endswith("/chat/completions"):
            writer.write(_response(404, b'{"error": {"message": "not found"}}', "application/json"))
            await writer.drain()
            return True
        body = request.json()
        with self._lock:
            self.chat_requests.append(body)
            self.chat_headers.append(request.headers)
        if self.behaviour == "close":
            return False
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.behaviour == "error":
            error = {
                "error": {
                    "message": f"This model's input is invalid: {_last_user_text(body)!r}",
                    "type": "BadRequestError",
                    "param": None,
                    "code": None,
                }
            }
            writer.write(
                _response(self.error_status, json.dumps(error).encode(), "application/json")
            )
            await writer.drain()
            return True
        model = body.get("model", STUB_MODEL) if isinstance(body, dict) else STUB_MODEL
        if isinstance(body, dict) and body.get("stream"):
            answer = _response(200, sse_events(str(model)), "text/event-stream", extra=self._extra)
        else:
            data = json.dumps(completion(str(model))).encode()
            answer = _response(200, data, "application/json", extra=self._extra)
        writer.write(answer)
        await writer.drain()
        return True

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)

        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture
def stub_factory() -> Iterator[Callable[..., StubServer]]:
    """Factory: ``stub_factory(behaviour, **options) -> StubServer``; stopped at teardown."""
    stubs: list[StubServer] = []

    def start(behaviour: str = "ok", **options: Any) -> StubServer:
        stub = StubServer(behaviour, **options)
        stubs.append(stub)
        return stub

    yield start
    for stub in stubs:
        stub.stop()
