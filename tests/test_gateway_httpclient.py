"""The gateway's own HTTP/1.1 upstream client against scripted servers on loopback: body
framings, keep-alive reuse and its limits, timeouts, disconnects, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gateway.httpclient import (
    HIGH_WATER,
    ConnectError,
    ConnectTimeout,
    Disconnected,
    Pool,
    ReadTimeout,
)
from tests.conftest import free_port
from tests.fixtures_gateway import connect_hangs


class Scripted:
    """A loopback server: each request gets the next scripted answer (``handler``)."""

    def __init__(self, answer: Callable[[int, bytes], object]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client.set()
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                answer = self.answer(len(self.requests), head + body)
                if asyncio.iscoroutine(answer):  # slow answers: watch for the client leaving
                    slow = asyncio.ensure_future(answer)
                    eof = asyncio.ensure_future(reader.read(1))
                    await asyncio.wait((slow, eof), return_when=asyncio.FIRST_COMPLETED)
                    if eof.done():
                        slow.cancel()
                        self.closed_by_client.set()
                        return
                    eof.cancel()
                    answer = slow.result()
                for piece in answer if isinstance(answer, list) else [answer]:
                    if piece is None:  # hang up
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        finally:
            writer.close()


def ok(body: bytes, *extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    return head + b"".join(extra) + b"content-length: %d\r\n\r\n%s" % (len(body), body)


def pool(url: str, **kw: float) -> Pool:
    settings = {"connect_timeout": 1.0, "read_timeout": 2.0, "keepalive_s": 4.0, **kw}
    return Pool(url, **settings)


async def test_content_length_bodies_reuse_one_connection():
    async with Scripted(lambda i, req: ok(b'{"n": %d}' % i, b"x-n: %d\r\n" % i)) as server:
        client = pool(server.url, keepalive_s=4.0)
        responses = []
        for i in (1, 2, 3):
            r = await client.request("POST", "/chat/completions", b'{"q": 1}', "application/json")
            assert await r.read() == b'{"n": %d}' % i
            r.release()
            responses.append(r)
        assert server.connections == 1
        # each response keeps its own headers after its connection served the next one
        assert [(r.status, r.headers["x-n"]) for r in responses] == [
            (200, "1"),
            (200, "2"),
            (200, "3"),
        ]
        assert responses[0].headers["content-type"] == "application/json"
        first = server.requests[0]
        assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"content-type: application/json\r\n" in first
        assert b"content-length: 8\r\n" in first and first.endswith(b'{"q": 1}')
        client.close()


async def test_chunked_body_split_anywhere_is_decoded():
    payload = b"data: one\n\ndata: two\n\n"
    framed = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (9, payload[:9], 13, payload[9:])
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    raw = head + framed
    pieces = [raw[i : i + 5] for i in range(0, len(raw), 5)]  # framing cut mid-token
    async with Scripted(lambda i, req: pieces) as server:
        client = pool(server.url)
        r = await client.request("GET", "/models")
        got = [piece async for piece in r.chunks()]
        assert b"".join(got) == payload and r.complete
        r.release()
        r = await client.request("GET", "/models")
        assert await r.read() == payload
        r.release()
        assert server.connections == 1  # chunked responses keep the connection


async def test_connection_close_and_read_until_close():
    answers = {
        1: ok(b"{}", b"connection: close\r\n"),
        2: [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", None],
        3: ok(b"{}"),
    }
    async with Scripted(lambda i, req: answers[i]) as server:
        client = pool(server.url)
        r = await client.request("GET", "/a")
        assert await r.read() == b"{}"
        r.release()
        r = await client.request("GET", "/b")  # the server closed: a fresh connection
        assert await r.read() == b"until the end" and r.complete
        r.release()
        r = await client.request("GET", "/c")
        assert await r.read() == b"{}"
        assert server.connections == 3


async def test_idle_connections_expire_and_closed_ones_are_not_reused():
    async with Scripted(lambda i, req: ok(b"{}")) as server:
        client = pool(server.url, keepalive_s=0.05)
        for path in ("/a", "/b"):
            r = await client.request("GET", path)
            await r.read()
            r.release()
            await asyncio.sleep(0.1)  # older than keepalive_s: dropped, not reused
        assert server.connections == 2
    # The server closes after answering (no "connection: close"): not reused either.
    async with Scripted(lambda i, req: [ok(b"{}"), None]) as server:
        client = pool(server.url)
        for path in ("/a", "/b"):
            r = await client.request("GET", path)
            assert await r.read() == b"{}"
            r.release()
            await asyncio.sleep(0.05)
        assert server.connections == 2


async def test_a_reused_connection_closed_by_the_server_says_so():
    async with Scripted(lambda i, req: ok(b"{}") if i == 1 else None) as server:
        client = pool(server.url)
        r = await client.request("GET", "/a")
        await r.read()
        r.release()
        with pytest.raises(Disconnected) as err:
            await client.request("GET", "/b")
        assert err.value.reused
        with pytest.raises(Disconnected) as err:  # a fresh one that closes: not "reused"
            await client.request("GET", "/c")
        assert not err.value.reused


async def test_closed_mid_body_is_an_error_not_a_short_body():
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"
    async with Scripted(lambda i, req: [head + b"only part", None]) as server:
        client = pool(server.url)
        r = await client.request("GET", "/a")
        with pytest.raises(Disconnected):
            await r.read()
        r.close()


async def test_read_timeouts_before_and_after_the_headers():
    async def silent(i: int, req: bytes) -> list[bytes]:
        await asyncio.sleep(5)
        return [ok(b"{}")]

    async with Scripted(silent) as server:
        client = pool(server.url, read_timeout=0.2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ReadTimeout):
            await client.request("GET", "/a")
        assert asyncio.get_running_loop().time() - started < 1
        await asyncio.wait_for(server.closed_by_client.wait(), 2)  # and the connection closed

    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"

    async def stalls(i: int, req: bytes) -> list[bytes]:
        return [head]  # then nothing more, connection kept open

    async with Scripted(stalls) as server:
        client = pool(server.url, read_timeout=0.2)
        r = await client.request("GET", "/a")
        chunks = r.chunks()
        assert await chunks.__anext__() == b"abc"
        with pytest.raises(ReadTimeout):
            await chunks.__anext__()
        r.close()
        await asyncio.wait_for(server.closed_by_client.wait(), 2)


async def test_connect_refused_and_connect_timeout():
    with pytest.raises(ConnectError) as err:
        await pool(f"http://127.0.0.1:{free_port()}/v1").request("GET", "/models")
    assert not isinstance(err.value, ConnectTimeout)
    with connect_hangs() as hanging:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectTimeout):
            await pool(hanging, connect_timeout=0.2).request("GET", "/models")
        assert 0.2 <= asyncio.get_running_loop().time() - started < 1


async def test_cancelling_a_request_closes_its_connection():
    async def slow(i: int, req: bytes) -> list[bytes]:
        await asyncio.sleep(5)
        return [ok(b"{}")]

    async with Scripted(slow) as server:
        client = pool(server.url)
        task = asyncio.ensure_future(client.request("POST", "/chat/completions", b"{}"))
        while not server.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 2)
        assert not client._idle


async def test_bodies_larger_than_the_read_buffer():
    big = bytes(range(256)) * (3 * HIGH_WATER // 256 + 7)
    async with Scripted(lambda i, req: ok(big)) as server:
        client = pool(server.url)
        r = await client.request("GET", "/a")
        assert await r.read() == big  # reading pauses and resumes without a stall
        r.release()
        r = await client.request("GET", "/a")
        received = b""
        async for piece in r.chunks():
            received += piece
            await asyncio.sleep(0.001)  # a slow consumer
        assert received == big
        r.release()
        assert server.connections == 1


async def test_upstream_key_and_host_headers_are_sent():
    async with Scripted(lambda i, req: ok(b"{}")) as server:
        client = Pool(
            server.url + "/",
            connect_timeout=1,
            read_timeout=1,
            keepalive_s=1,
            headers={"authorization": "Bearer sk-up"},
        )
        r = await client.request("GET", "/models")
        await r.read()
        sent = server.requests[0]
        port = server.url.split(":")[2].split("/")[0]
        assert sent.startswith(b"GET /v1/models HTTP/1.1\r\n")
        assert b"host: 127.0.0.1:%s\r\n" % port.encode() in sent
        assert b"authorization: Bearer sk-up\r\n" in sent
