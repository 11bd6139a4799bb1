"""The gateway under hostile or broken peers, through HTTP only: upstreams that hang up after
reading a request, huge message lists, slowloris clients, connection floods, auth failures in
the metrics and the access log, secrets in upstream errors, unbounded model labels, idle
upstream connections, and many slow streams at once.

Settings used here (agreed for the gateway rebuild): ``max_messages``, ``header_timeout``,
``max_connections``, ``upstream_max_connections``; idle upstream connections expire after ~4 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import threading
import time

import httpx
import orjson
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "标题：国足主场2比0战胜对手，晋级下一轮"}]


# ---- helpers ------------------------------------------------------------------------------


def chat(gw, model: str, *, stream: bool = False, messages=QUESTION, key: str | None = None,
         timeout: float = 10) -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": messages, "stream": stream}
    return httpx.post(gw.base_url + "/chat/completions", json=body, headers=headers,
                      timeout=timeout)  # fmt: skip


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        match = re.match(r"^([^{ ]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def eventually(get, timeout: float = 5.0):
    """The first value ``get()`` returns without raising, retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get()
        except (IndexError, KeyError, AssertionError, StopIteration):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def closed_within(sock: socket.socket, timeout: float, drip: bytes = b"", every: float = 0.2):
    """Seconds until the peer closes ``sock`` (EOF or reset), sending ``drip`` one byte at a
    time every ``every`` seconds meanwhile (repeated); None if still open after ``timeout``."""
    t0 = time.monotonic()
    i = 0
    next_send = t0
    while (now := time.monotonic()) - t0 < timeout:
        if drip and now >= next_send:
            try:
                sock.send(drip[i % len(drip) : i % len(drip) + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
            i += 1
            next_send += every
        wait = max(0.0, min(next_send if drip else now + 0.2, t0 + timeout) - time.monotonic())
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, ConnectionAbortedError):
                return time.monotonic() - t0
            if not data:
                return time.monotonic() - t0
            # a response (e.g. 408) before the close is fine: keep reading until EOF
    return None


def raw_get(sock: socket.socket, path: str = "/health", timeout: float = 5.0) -> bytes:
    """Send a GET on ``sock`` and return what comes back before EOF or the head is complete
    with its body (Content-Length)."""
    sock.settimeout(timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
    return data


# ---- 1. an upstream that reads the request and hangs up --------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_closing_after_the_request_is_502_and_never_resent(
    gateway, standin_factory, stub_factory, stream
):
    closer = stub_factory("close")
    healthy = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=f"{closer.base_url},{healthy.base_url}")
    connect_before = samples(gw.metrics(), "gateway_upstream_errors_total", reason="connect")
    hits = 0
    for _ in range(10):  # the pick alternates; keep asking until the closer got two
        closer_before, healthy_before = len(closer.chat_requests), len(healthy.requests())
        r = chat(gw, healthy.model, stream=stream)
        if len(closer.chat_requests) == closer_before:
            assert r.status_code == 200, r.text
            continue
        hits += 1
        assert r.status_code == 502, (r.status_code, r.text[:300])
        assert r.json()["error"]["type"]
        assert len(closer.chat_requests) == closer_before + 1  # sent once, never again
        assert len(healthy.requests()) == healthy_before  # nor to the other upstream
        if hits == 2:
            break
    # not marked down: with two upstreams and nothing in flight, it keeps being picked
    assert hits == 2, f"the closing upstream got {hits} of 10 requests"
    text = gw.metrics()
    assert samples(text, "gateway_upstream_errors_total", reason="connect") == connect_before
    assert samples(text, "gateway_requests_total", status="502") == 2


# ---- 2. too many messages -----------------------------------------------------------------


def test_a_huge_message_list_is_400_fast_and_others_are_not_stalled(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url)
    big = orjson.dumps(
        {"model": upstream.model, "messages": [{"role": "user", "content": "x"}] * 100_000}
    )
    assert len(big) < 4 * 1024 * 1024
    chat(gw, upstream.model)  # warm: connections, first-call costs
    result: dict = {}

    def send_big() -> None:
        t0 = time.perf_counter()
        result["response"] = httpx.post(
            gw.base_url + "/chat/completions",
            content=big,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        result["elapsed"] = time.perf_counter() - t0

    thread = threading.Thread(target=send_big)
    thread.start()
    latencies = []
    while thread.is_alive() or not latencies:
        t0 = time.perf_counter()
        assert chat(gw, upstream.model).status_code == 200
        latencies.append(time.perf_counter() - t0)
    thread.join()
    r = result["response"]
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == "messages"
    assert result["elapsed"] < 2.0, result["elapsed"]
    assert max(latencies) < 0.5, latencies
    assert len(upstream.requests()) == len(latencies) + 1  # the big one never went upstream


def test_max_messages_setting(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url, max_messages=3)
    turns = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        QUESTION[0],
    ]
    over = chat(gw, upstream.model, messages=[{"role": "system", "content": "简短"}, *turns])
    assert over.status_code == 400, over.text[:300]
    assert over.json()["error"]["param"] == "messages"
    assert chat(gw, upstream.model, messages=turns).status_code == 200


def test_deeply_nested_bodies_are_400_and_the_gateway_keeps_serving(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url)
    url = gw.base_url + "/chat/completions"
    too_deep = b"[" * 200_000 + b"]" * 200_000  # past the JSON parser's depth limit
    nested_content = (
        b'{"model": "m", "messages": [{"role": "user", "content": '
        + b"[" * 500 + b"]" * 500 + b"}]}"
    )  # fmt: skip
    for body, words in ((too_deep, "invalid JSON"), (nested_content, "messages.0")):
        t0 = time.perf_counter()
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert words in r.json()["error"]["message"]
        assert time.perf_counter() - t0 < 2.0
    assert chat(gw, upstream.model).status_code == 200
    assert upstream.requests() and len(upstream.requests()) == 1  # nothing bad went upstream


# ---- 3. slowloris ---------------------------------------------------------------------------


def test_slow_or_silent_request_heads_are_cut_off(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url, header_timeout=1.0)
    port = int(gw.root_url.rsplit(":", 1)[1])
    drip = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: yes\r\n" * 40
    with socket.create_connection(("127.0.0.1", port)) as slow:
        took = closed_within(slow, 5.0, drip=drip, every=0.2)
    assert took is not None, "a request head dripping a byte every 0.2 s was never cut off"
    assert 0.5 <= took <= 3.0, took
    with socket.create_connection(("127.0.0.1", port)) as silent:
        took = closed_within(silent, 5.0)
    assert took is not None, "a connection that sent nothing was never closed"
    assert took <= 3.0, took
    # keep-alive: a second request's head counts from its own first byte
    with socket.create_connection(("127.0.0.1", port)) as kept:
        assert raw_get(kept).startswith(b"HTTP/1.1 200")
        kept.send(b"GET /hea")
        took = closed_within(kept, 5.0, drip=b"dlth", every=0.3)
    assert took is not None and took <= 3.0, took
    assert chat(gw, upstream.model).status_code == 200


# ---- 4. connection limit --------------------------------------------------------------------


def test_connections_beyond_the_limit_are_refused_and_the_rest_keep_working(
    gateway, standin_factory
):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url, max_connections=20, header_timeout=30.0)
    port = int(gw.root_url.rsplit(":", 1)[1])
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.3)  # let the server accept them all
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        t0 = time.monotonic()
        try:
            answer = raw_get(extra, timeout=3.0)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
        finally:
            extra.close()
        assert time.monotonic() - t0 < 2.5
        assert answer == b"" or answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert raw_get(held[0]).startswith(b"HTTP/1.1 200")  # the admitted ones still work
    finally:
        for sock in held:
            sock.close()
    eventually(lambda: _assert_ok(chat(gw, upstream.model, timeout=2)), timeout=5)


def _assert_ok(r: httpx.Response) -> httpx.Response:
    assert r.status_code == 200, r.status_code
    return r


# ---- 5. auth errors, oversized bodies and rate limits in metrics and the access log --------

GOOD, LIMITED, WRONG = "sk-good-7c1d5e", "sk-limited-93ab2f", "sk-wrong-55aa0b"


def _no_key_material(gw) -> None:
    logged, scraped = gw.access_log.read_text(), gw.metrics()
    for key in (GOOD, LIMITED, WRONG):
        assert key not in logged and key not in scraped, key
        assert key[3:] not in logged and key[3:] not in scraped, key


def test_401_is_counted_and_logged_without_the_key(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url, api_keys=GOOD)
    assert chat(gw, upstream.model, key=GOOD).status_code == 200
    for key in (WRONG, None):
        assert chat(gw, upstream.model, key=key).status_code == 401
    assert samples(gw.metrics(), "gateway_requests_total", status="401") == 2
    rows = eventually(lambda: _assert_len([r for r in gw.log_rows() if r["status"] == 401], 2))
    assert len(rows) == 2
    good_id = next(r["key"] for r in gw.log_rows() if r["status"] == 200)
    assert all(r.get("key") != good_id for r in rows)
    _no_key_material(gw)


def test_413_and_429_are_counted_and_logged_with_the_key_id(gateway, standin_factory, tmp_path):
    upstream = standin_factory(reasoning_format="inline")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{LIMITED} rpm=1\n")
    gw = gateway(
        upstreams=upstream.base_url,
        api_keys=GOOD,
        api_keys_file=str(keys_file),
        max_body_bytes=1024,
    )
    assert chat(gw, upstream.model, key=GOOD).status_code == 200
    big = [{"role": "user", "content": "x" * 2000}]
    assert chat(gw, upstream.model, key=GOOD, messages=big).status_code == 413
    assert chat(gw, upstream.model, key=LIMITED).status_code == 200
    assert chat(gw, upstream.model, key=LIMITED).status_code == 429
    text = gw.metrics()
    assert samples(text, "gateway_requests_total", status="413") == 1
    assert samples(text, "gateway_requests_total", status="429") == 1
    rows = eventually(lambda: _assert_len(gw.log_rows(), 4))
    by_status: dict[int, list[dict]] = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    good_id, limited_id = (r["key"] for r in by_status[200])
    assert good_id and limited_id and good_id != limited_id
    assert by_status[413][0]["key"] == good_id
    assert by_status[429][0]["key"] == limited_id
    _no_key_material(gw)


def _assert_len(rows: list, n: int) -> list:
    assert len(rows) >= n, rows
    return rows


# ---- 6. upstream error messages stay out of the access log -----------------------------------

SECRET = "my-secret-prompt-ZQ81x"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upstream_error_messages_are_not_logged(gateway, stub_factory, stream):
    stub = stub_factory("error", error_status=400)
    gw = gateway(upstreams=stub.base_url)
    r = chat(gw, "stub-model", stream=stream, messages=[{"role": "user", "content": SECRET}])
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["message"]  # the client does get the upstream's error
    row = eventually(lambda: gw.log_rows()[-1])
    assert row["status"] == 400
    assert row.get("error"), row  # a reason …
    assert SECRET not in gw.access_log.read_text()  # … but not the upstream's words


# ---- 7. model labels stay bounded -----------------------------------------------------------


def test_models_the_upstream_does_not_list_are_labelled_other(gateway, stub_factory):
    stub = stub_factory("ok", models=("stub-model",))
    gw = gateway(upstreams=stub.base_url, models="configured-model")
    eventually(lambda: _assert_ok(httpx.get(gw.root_url + "/ready", timeout=2)))
    listed = httpx.get(gw.base_url + "/models", timeout=5).json()["data"]
    assert [m["id"] for m in listed] == ["stub-model"]
    assert chat(gw, "stub-model").status_code == 200
    assert chat(gw, "configured-model").status_code == 200
    for i in range(4):
        assert chat(gw, f"made-up-{i}", stream=i % 2 == 1).status_code == 200
    text = gw.metrics()
    assert "made-up" not in text
    assert samples(text, "gateway_requests_total", model="stub-model", status="200") == 1
    assert samples(text, "gateway_requests_total", model="configured-model", status="200") == 1
    assert samples(text, "gateway_requests_total", model="other", status="200") == 4


# ---- 8. idle upstream connections expire ----------------------------------------------------


async def _streams(url: str, model: str, n: int, timeout: float) -> list[tuple[int, str]]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one() -> tuple[int, str]:
            body = {"model": model, "messages": QUESTION, "stream": True}
            async with client.stream("POST", url, json=body) as r:
                text = "".join([part async for part in r.aiter_text()])
                return r.status_code, text

        return await asyncio.gather(*(one() for _ in range(n)))


def test_idle_upstream_connections_expire_after_a_burst(gateway, stub_factory):
    stub = stub_factory("ok", delay=0.5)
    gw = gateway(upstreams=stub.base_url)
    results = asyncio.run(_streams(gw.base_url + "/chat/completions", "stub-model", 50, 15))
    assert all(status == 200 and "data: [DONE]" in text for status, text in results)
    assert stub.peak_connections >= 20, stub.peak_connections  # the burst was concurrent
    deadline = time.monotonic() + 10
    while stub.open_connections > 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stub.open_connections <= 4, f"{stub.open_connections} idle connections kept open"
    r = chat(gw, "stub-model", stream=True)
    assert r.status_code == 200 and "data: [DONE]" in r.text


def test_upstream_connections_are_capped_per_upstream(gateway, stub_factory):
    stub = stub_factory("ok", delay=0.3)
    gw = gateway(upstreams=stub.base_url, upstream_max_connections=5)
    results = asyncio.run(_streams(gw.base_url + "/chat/completions", "stub-model", 20, 14))
    assert all(status == 200 and "data: [DONE]" in text for status, text in results)
    assert len(stub.chat_requests) == 20
    assert stub.peak_connections <= 5, stub.peak_connections


# ---- 9. load smoke ---------------------------------------------------------------------------


def test_200_concurrent_slow_streams_all_finish(gateway, standin_factory):
    # the stand-in streams 4 events here: 500 ms apart, each stream lasts ~2 s
    upstream = standin_factory(reasoning_format="inline", chunk_delay_ms=500)
    gw = gateway(upstreams=upstream.base_url)
    t0 = time.monotonic()
    results = asyncio.run(_streams(gw.base_url + "/chat/completions", upstream.model, 200, 14))
    elapsed = time.monotonic() - t0
    assert [s for s, _ in results] == [200] * 200
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in results)
    assert 1.5 < elapsed < 14, elapsed  # slow streams, all at once
    assert samples(gw.metrics(), "gateway_requests_total", status="200") == 200


# ---- 10. no cookie crosses from one client's request to another's -------------------------


def test_a_cookie_an_upstream_sets_is_never_sent_with_another_request(gateway, stub_factory):
    """One upstream session carries every client's requests: a cookie set in one answer
    would otherwise go out with the next client's request."""
    stub = stub_factory("ok", set_cookie="session=for-client-a; Path=/")
    # by host name, as upstreams are named in compose and k8s (cookie jars ignore IP hosts)
    gw = gateway(upstreams=f"http://localhost:{stub.port}/v1")
    for stream in (False, True, False):
        response = chat(gw, "stub-model", stream=stream)
        assert response.status_code == 200
        assert "set-cookie" not in response.headers  # nor is it passed on to the client
    assert len(stub.chat_headers) == 3
    assert [h for h in stub.chat_headers if "cookie" in h] == []
