"""The gateway against stand-in upstreams: think modes, streaming, errors, limits, metrics."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import orjson
import pytest

from distill_common.think import format_answer, split_think
from pipeline.standin.faults import request_key
from tests.conftest import ROOT, free_port
from tests.fixtures_gateway import connect_hangs

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "标题：国足主场2比0战胜对手，晋级下一轮"}]


def direct_parts(standin, messages=QUESTION) -> tuple[str, str]:
    """(reasoning, answer) as the stand-in itself answers (it is deterministic)."""
    body = {"model": standin.model, "messages": messages}
    message = httpx.post(standin.base_url + "/chat/completions", json=body).json()["choices"][0][
        "message"
    ]
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning is not None:
        return reasoning, message["content"]
    parts = split_think(message["content"])
    return parts.reasoning, parts.answer


def eventually(get, timeout: float = 5.0):
    """The first value ``get()`` returns without raising, retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get()
        except (IndexError, KeyError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def sdk(gw, key: str = "none", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, **kw)


def reasoning_of(obj) -> str | None:
    extra = obj.model_extra or {}
    return extra.get("reasoning_content", extra.get("reasoning"))


def collect_stream(stream) -> tuple[str, str, list]:
    reasoning, answer, chunks = [], [], []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            answer.append(choice.delta.content or "")
            reasoning.append(reasoning_of(choice.delta) or "")
    return "".join(reasoning), "".join(answer), chunks


def test_importing_the_gateway_never_imports_torch():
    code = "import sys, gateway.app, gateway.__main__; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_an_upstream_that_split_already_is_never_parsed_again():
    from gateway.modes import StreamShaper, shape_completion

    message = {"role": "assistant", "reasoning": "想想", "content": "答 </think> 案"}
    body = {"choices": [{"index": 0, "message": message}], "usage": {"completion_tokens": 4}}
    shape_completion(body, "separate", "reasoning_content", started_in_think=True)
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "答 </think> 案",
        "reasoning_content": "想想",
    }
    shaper = StreamShaper("hide", "reasoning_content", True, client_wants_usage=False, t0=0)
    out = [
        shaper.event(orjson.dumps({"choices": [{"index": 0, "delta": delta}]}))
        for delta in [{"reasoning": "想想"}, {"content": "<think>答"}, {"content": "案"}]
    ]
    assert out[0] is None
    assert [orjson.loads(o[6:])["choices"][0]["delta"]["content"] for o in out[1:]] == [
        "<think>答",
        "案",
    ]


@pytest.mark.parametrize("fmt", ["inline", "inline-no-open", "reasoning_content", "reasoning"])
@pytest.mark.parametrize("mode", ["separate", "hide", "inline"])
def test_modes_non_streaming_and_streaming_through_the_sdk(gateway, standins, fmt, mode):
    upstream = standins[fmt]
    reasoning, answer = direct_parts(upstream)
    gw = gateway(upstreams=upstream.base_url, think=mode)
    client = sdk(gw)

    whole = client.chat.completions.create(model=upstream.model, messages=QUESTION)
    message = whole.choices[0].message
    stream = client.chat.completions.create(
        model=upstream.model,
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    s_reasoning, s_answer, chunks = collect_stream(stream)

    if mode == "separate":
        assert (reasoning_of(message), message.content) == (reasoning, answer)
        assert (s_reasoning, s_answer) == (reasoning, answer)
    elif mode == "hide":
        assert (reasoning_of(message), message.content) == (None, answer)
        assert (s_reasoning, s_answer) == ("", answer)
    else:
        assert reasoning_of(message) is None and s_reasoning == ""
        inline = split_think(message.content)
        assert (inline.reasoning, inline.answer) == (reasoning, answer)
        streamed = split_think(s_answer)
        assert (streamed.reasoning, streamed.answer) == (reasoning, answer)
        if fmt.startswith("inline"):  # the model's own text, untouched
            assert message.content == s_answer
    usage = whole.usage
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0
    assert chunks[-1].usage.total_tokens == usage.total_tokens


def test_per_request_overrides_and_unknown_values(gateway, standins):
    upstream = standins["reasoning_content"]
    reasoning, answer = direct_parts(upstream)
    gw = gateway(upstreams=upstream.base_url, think="separate")
    client = sdk(gw)
    ask = {"model": upstream.model, "messages": QUESTION}

    hidden = client.chat.completions.create(**ask, extra_body={"include_reasoning": False})
    assert reasoning_of(hidden.choices[0].message) is None
    excluded = client.chat.completions.create(**ask, extra_body={"reasoning": {"exclude": True}})
    assert reasoning_of(excluded.choices[0].message) is None
    inline = client.chat.completions.create(
        **ask, extra_body={"include_reasoning": False}, extra_headers={"X-Think": "inline"}
    )
    assert inline.choices[0].message.content == format_answer(reasoning, answer)

    hide_gw = gateway(upstreams=upstream.base_url, think="hide")
    shown = sdk(hide_gw).chat.completions.create(**ask, extra_body={"include_reasoning": True})
    assert reasoning_of(shown.choices[0].message) == reasoning

    for bad in [
        {"extra_headers": {"X-Think": "sometimes"}},
        {"extra_body": {"include_reasoning": "no"}},
        {"extra_body": {"reasoning": {"exclude": "yes"}}},
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**ask, **bad)
        assert err.value.status_code == 400
        assert set(err.value.body) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**ask, stream=True, extra_headers={"X-Think": "loud"})
    assert "gateway_in_flight_requests 0.0" in gw.metrics()  # nothing leaked


def test_reasoning_field_names(gateway, standins):
    upstream = standins["inline"]
    reasoning, _ = direct_parts(upstream)
    for field, names in [
        ("reasoning", {"reasoning"}),
        ("both", {"reasoning", "reasoning_content"}),
    ]:
        gw = gateway(upstreams=upstream.base_url, reasoning_field=field)
        body = {"model": upstream.model, "messages": QUESTION}
        message = httpx.post(gw.base_url + "/chat/completions", json=body).json()["choices"][0][
            "message"
        ]
        assert {k for k in message if k.startswith("reasoning")} == names
        assert all(message[name] == reasoning for name in names)


def test_history_is_stripped_and_usage_requested_upstream(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline")
    gw = gateway(upstreams=upstream.base_url)
    history = [
        {"role": "user", "content": "标题：A"},
        {"role": "assistant", "content": "<think>\n长长的推理\n</think>\n\n体育"},
        {"role": "user", "content": "标题：B"},
        {"role": "assistant", "content": "财经", "reasoning_content": "又一段推理"},
        {"role": "user", "content": "标题：C"},
    ]
    body = {"model": upstream.model, "messages": history, "stream": True, "include_reasoning": True}
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        r.read()
    stripped = [
        {"role": "user", "content": "标题：A"},
        {"role": "assistant", "content": "体育"},
        {"role": "user", "content": "标题：B"},
        {"role": "assistant", "content": "财经"},
        {"role": "user", "content": "标题：C"},
    ]
    # The stand-in logs a hash of the body it got (minus stream options): it must be the
    # hash of the stripped history, without the gateway-only fields.
    expected = request_key({"model": upstream.model, "messages": stripped, "stream": True})
    assert upstream.requests()[-1]["key"] == expected


def test_cut_off_reasoning_never_leaks_into_the_answer(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline", faults="truncate=1")
    gw = gateway(upstreams=upstream.base_url, think="hide")
    client = sdk(gw)
    whole = client.chat.completions.create(model=upstream.model, messages=QUESTION)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == ("", "length")
    stream = client.chat.completions.create(model=upstream.model, messages=QUESTION, stream=True)
    _, answer, chunks = collect_stream(stream)
    assert answer == "" and chunks[-1].choices[0].finish_reason == "length"
    assert 'gateway_think_anomalies_total{kind="unclosed"} 2.0' in gw.metrics()


def test_without_include_usage_the_client_gets_no_usage_chunk(gateway, standins):
    upstream = standins["inline"]
    gw = gateway(upstreams=upstream.base_url)
    stream = sdk(gw).chat.completions.create(model=upstream.model, messages=QUESTION, stream=True)
    _, answer, chunks = collect_stream(stream)
    assert answer and all(chunk.usage is None and chunk.choices for chunk in chunks)
    row = gw.log_rows()[-1]  # the gateway asked for usage upstream anyway
    assert row["prompt_tokens"] > 0 and row["reasoning_tokens"] > 0


def test_hide_mode_sends_keepalive_comments_during_reasoning(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline", chunk_delay_ms=150)
    gw = gateway(upstreams=upstream.base_url, think="hide", keepalive_interval=0.1)
    body = {"model": upstream.model, "messages": QUESTION, "stream": True}
    lines = []
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=body, timeout=30) as r:
        lines = list(r.iter_lines())

    def has_answer(line: str) -> bool:
        if not line.startswith("data: {"):
            return False
        return any(c["delta"].get("content") for c in orjson.loads(line[6:])["choices"])

    first_answer = next(i for i, line in enumerate(lines) if has_answer(line))
    assert sum(line.startswith(": keep-alive") for line in lines[:first_answer]) >= 2
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"


def test_auth_keys_from_settings_and_file(gateway, standins, tmp_path):
    upstream = standins["inline"]
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-file-key rpm=100\n")
    gw = gateway(upstreams=upstream.base_url, api_keys="sk-env-key", api_keys_file=str(keys_file))
    ask = {"model": upstream.model, "messages": QUESTION}
    for key in ["sk-env-key", "sk-file-key"]:
        assert sdk(gw, key).chat.completions.create(**ask).choices[0].message.content
        assert sdk(gw, key).models.list().data[0].id == upstream.model
    for key in ["sk-wrong-secret"]:
        with pytest.raises(openai.AuthenticationError) as err:
            sdk(gw, key).chat.completions.create(**ask)
        assert "sk-wrong-secret" not in str(err.value)
        with pytest.raises(openai.AuthenticationError):
            sdk(gw, key).models.list()
    for path in ["/v1/models", "/v1/chat/completions", "/v1/embeddings"]:
        r = httpx.post(gw.root_url + path, json=ask)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(gw.root_url + "/health").status_code == 200  # ops routes stay open
    logged = gw.access_log.read_text()
    assert "sk-env-key" not in logged and "sk-file-key" not in logged and "sk-wrong" not in logged


def test_bad_keys_file_names_file_and_line(tmp_path):
    from gateway.auth import KeysFileError, load_keys
    from gateway.settings import Settings

    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("sk-a\nsk-b rpm=fast\n")
    with pytest.raises(KeysFileError, match=r"keys.txt:2: expected"):
        load_keys(Settings(api_keys_file=keys_file))


def test_rate_and_concurrency_limits_answer_429_with_retry_after(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline", latency_ms=400)
    gw = gateway(upstreams=upstream.base_url, api_keys="k1,k2", rate_limit_rpm=3)
    body = {"model": upstream.model, "messages": QUESTION}
    auth = {"Authorization": "Bearer k1"}
    statuses = [
        httpx.post(gw.base_url + "/chat/completions", json=body, headers=auth) for _ in range(4)
    ]
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert int(statuses[-1].headers["retry-after"]) >= 1
    assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"
    other = httpx.post(
        gw.base_url + "/chat/completions", json=body, headers={"Authorization": "Bearer k2"}
    )
    assert other.status_code == 200  # limits are per key

    gw2 = gateway(upstreams=upstream.base_url, api_keys="k1", max_concurrent_per_key=1)
    results: list[int] = []

    def call() -> None:
        r = httpx.post(gw2.base_url + "/chat/completions", json=body, headers=auth, timeout=10)
        results.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200, 429, 429]


def test_bad_bodies(gateway, standins):
    upstream = standins["inline"]
    gw = gateway(upstreams=upstream.base_url, max_body_bytes=2048)
    url = gw.base_url + "/chat/completions"
    cases = [
        (b"{not json", 400, "invalid JSON"),
        (b"[1, 2]", 400, "object"),
        (orjson.dumps({"model": "m"}), 400, "messages"),
        (orjson.dumps({"model": "m", "messages": [{"role": "wizard"}]}), 400, "messages.0.role"),
        (orjson.dumps({"model": "m", "messages": QUESTION, "n": 0}), 400, "n"),
        (
            orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 4000}]}),
            413,
            "limit",
        ),
    ]
    for body, status, words in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body[:40], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert words in error["message"]
    chunked = httpx.post(url, content=iter([b"{", b" " * 3000, b"}"]))
    assert chunked.status_code == 413
    assert httpx.get(gw.root_url + "/nowhere").json()["error"]["type"] == "not_found_error"


def test_upstream_errors_are_passed_in_openai_shape(gateway, standins):
    upstream = standins["inline"]
    gw = gateway(upstreams=upstream.base_url)
    with pytest.raises(openai.NotFoundError) as err:
        sdk(gw).chat.completions.create(model="no-such-model", messages=QUESTION)
    assert "no-such-model" in err.value.message


def test_least_in_flight_and_retry_on_dead_upstream(gateway, standin_factory):
    slow = standin_factory(reasoning_format="inline", latency_ms=1500)
    fast = standin_factory(reasoning_format="inline")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    gw = gateway(upstreams=f"{dead},{slow.base_url},{fast.base_url}")
    client = sdk(gw)
    results = []

    def call(i: int) -> None:
        messages = [{"role": "user", "content": f"标题：第{i}条体育新闻"}]
        results.append(client.chat.completions.create(model=fast.model, messages=messages))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:  # one every 50 ms: the slow upstream stays busy, the fast one is free
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(results) == 8  # the dead upstream cost retries, not failures
    assert len(slow.requests()) <= 1 and len(fast.requests()) >= 7
    assert 'gateway_upstream_errors_total{reason="connect"}' in gw.metrics()

    burst = [threading.Thread(target=call, args=(i,)) for i in range(8, 16)]
    for t in burst:  # all at once on two slow-ish upstreams: shared evenly
        t.start()
    for t in burst:
        t.join()
    assert len(results) == 16


def test_all_upstreams_down_is_503_and_not_ready(gateway):
    dead = ",".join(f"http://127.0.0.1:{free_port()}/v1" for _ in range(2))
    gw = gateway(upstreams=dead)
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gw).chat.completions.create(model="m", messages=QUESTION)
    assert err.value.status_code == 503
    assert httpx.get(gw.root_url + "/ready").status_code == 503
    assert httpx.get(gw.root_url + "/health").status_code == 200


def assert_timeout_error(r: httpx.Response) -> None:
    """A 504 in OpenAI's error shape."""
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("timeout", "upstream_timeout")


def test_first_byte_and_total_timeouts_are_504(gateway, standin_factory):
    slow = standin_factory(reasoning_format="inline", latency_ms=3000)
    url_body = {"model": slow.model, "messages": QUESTION}
    gw = gateway(upstreams=slow.base_url, first_byte_timeout=0.3)
    for stream in (False, True):
        started = time.monotonic()
        r = httpx.post(gw.base_url + "/chat/completions", json={**url_body, "stream": stream})
        assert_timeout_error(r)
        assert time.monotonic() - started < 2
    with pytest.raises(openai.APIStatusError) as err:
        sdk(gw).chat.completions.create(model=slow.model, messages=QUESTION)
    assert err.value.status_code == 504
    assert 'gateway_upstream_errors_total{reason="first_byte_timeout"} 3.0' in gw.metrics()

    gw2 = gateway(upstreams=slow.base_url, total_timeout=0.3)
    started = time.monotonic()
    assert_timeout_error(httpx.post(gw2.base_url + "/chat/completions", json=url_body))
    assert time.monotonic() - started < 2
    assert 'gateway_upstream_errors_total{reason="total_timeout"} 1.0' in gw2.metrics()


def test_connect_timeout_is_504_in_openai_shape(gateway):
    with connect_hangs() as hanging:
        gw = gateway(upstreams=hanging, connect_timeout=0.3)
        body = {"model": "m", "messages": QUESTION}
        for stream in (False, True):
            started = time.monotonic()
            r = httpx.post(gw.base_url + "/chat/completions", json={**body, "stream": stream})
            assert_timeout_error(r)
            assert 0.3 <= time.monotonic() - started < 2
        text = gw.metrics()
    assert 'gateway_upstream_errors_total{reason="connect_timeout"} 2.0' in text
    assert [row["status"] for row in gw.log_rows()] == [504, 504]


def test_connect_timeout_is_retried_on_another_upstream(gateway, standin_factory):
    fast = standin_factory(reasoning_format="inline")
    with connect_hangs() as hanging:
        gw = gateway(upstreams=f"{hanging},{fast.base_url}", connect_timeout=0.3)
        client = sdk(gw)
        # Both upstreams idle: ties are rotated, so one of the first two tries the hanging
        # one first; after its connect timeout it is tried last for a while.
        for i in range(4):
            started = time.monotonic()
            messages = [{"role": "user", "content": f"标题：第{i}条体育新闻"}]
            out = client.chat.completions.create(model=fast.model, messages=messages)
            assert out.choices[0].message.content
            assert time.monotonic() - started < 0.3 + 1.5
        text = gw.metrics()
    timeouts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('gateway_upstream_errors_total{reason="connect_timeout"}')
    ]
    assert timeouts and timeouts[0] >= 1  # the hanging upstream was tried, and skipped
    assert len(fast.requests()) == 4
    assert [row["status"] for row in gw.log_rows()] == [200] * 4


def test_non_streaming_client_hang_up_is_noticed_at_once(gateway, standin_factory):
    """A client that hangs up while the upstream works is logged as 499 at once (the
    upstream call is cancelled, not waited for) and leaves nothing in flight."""
    slow = standin_factory(reasoning_format="inline", latency_ms=3000)
    gw = gateway(upstreams=slow.base_url)
    body = orjson.dumps({"model": slow.model, "messages": QUESTION})
    port = int(gw.root_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        time.sleep(0.3)
    hung_up = time.monotonic()
    row = eventually(lambda: gw.log_rows()[-1], timeout=2.5)
    assert time.monotonic() - hung_up < 1.5  # not after the upstream's 3 s
    assert (row["status"], row["error"]) == (499, "client_disconnected")
    assert "gateway_in_flight_requests 0.0" in gw.metrics()


def test_upstream_dying_mid_stream_gives_an_error_event_fast(gateway, standin_factory):
    upstream = standin_factory(reasoning_format="inline", chunk_delay_ms=300)
    gw = gateway(upstreams=upstream.base_url)
    stream = sdk(gw).chat.completions.create(model=upstream.model, messages=QUESTION, stream=True)
    first = next(iter(stream))
    assert first.choices
    killed = time.monotonic()
    upstream.process.kill()
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    assert time.monotonic() - killed < 1.0
    row = eventually(lambda: gw.log_rows()[-1])
    assert row["status"] == 502 and row["error"] == "closed"


def test_ready_models_and_bounded_metric_labels(gateway, standins):
    upstream = standins["inline"]
    gw = gateway(upstreams=upstream.base_url)
    assert httpx.get(gw.root_url + "/ready").json()["status"] == "ready"
    client = sdk(gw)
    client.chat.completions.create(model=upstream.model, messages=QUESTION)
    list(client.chat.completions.create(model=upstream.model, messages=QUESTION, stream=True))
    for i in range(3):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"made-up-{i}", messages=QUESTION)
    text = gw.metrics()
    for name in [
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_time_to_first_reasoning_token_seconds_bucket",
        "gateway_time_to_first_answer_token_seconds_bucket",
        'gateway_tokens_total{kind="reasoning"}',
        'gateway_tokens_total{kind="answer"}',
        'gateway_tokens_total{kind="prompt"}',
        "gateway_in_flight_requests 0.0",
        "gateway_upstream_errors_total",
        'gateway_think_anomalies_total{kind="unclosed"}',
        "gateway_overhead_seconds_bucket",
    ]:
        assert name in text, name
    assert "made-up" not in text
    assert f'model="{upstream.model}",status="200",stream="true",think="separate"' in text
    assert 'model="other",status="404",stream="false",think="separate"' in text
    rows = gw.log_rows()
    assert {"request_id", "model", "mode", "status", "latency_ms"} <= set(rows[0])
    assert rows[0]["reasoning_tokens"] > 0 and rows[0]["answer_tokens"] > 0


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)
def test_promtool_accepts_the_scrape(gateway, standins):
    upstream = standins["inline"]
    gw = gateway(upstreams=upstream.base_url)
    sdk(gw).chat.completions.create(model=upstream.model, messages=QUESTION)
    scrape = gw.metrics()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    """Until the gateway started as ``proc`` answers ``/health`` on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)


def test_cli_serves_from_environment(standins, tmp_path):
    upstream = standins["inline"]
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_UPSTREAMS": upstream.base_url,
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_THINK": "hide",
        "GATEWAY_API_KEYS": "sk-cli",
        "GATEWAY_ACCESS_LOG": str(tmp_path / "access.jsonl"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        wait_healthy(port, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli")
        message = client.chat.completions.create(model=upstream.model, messages=QUESTION)
        assert reasoning_of(message.choices[0].message) is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run(
        [sys.executable, "-m", "gateway"], cwd=ROOT, capture_output=True, text=True,
        env={**env, "GATEWAY_THINK": "loud"},
    )  # fmt: skip
    assert bad.returncode == 2 and "think" in bad.stderr


def test_refuses_to_listen_beyond_loopback_without_keys(standins, tmp_path):
    """The image's entry point: 0.0.0.0 without keys is refused in one line, unless the user
    says so (GATEWAY_ALLOW_ANONYMOUS); on loopback no keys are needed."""
    port = free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "GATEWAY_UPSTREAMS": standins["inline"].base_url,
        "GATEWAY_PORT": str(port),
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_ACCESS_LOG": "",
    }
    refused = subprocess.run(
        [sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "GATEWAY_ALLOW_ANONYMOUS=true" in refused.stderr
    for allowed in ({"GATEWAY_ALLOW_ANONYMOUS": "true"}, {"GATEWAY_HOST": "127.0.0.1"}):
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env={**env, **allowed})
        try:
            wait_healthy(port, proc)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def test_schemathesis_finds_no_server_errors(gateway, standin_factory, tmp_path):
    upstream = standin_factory(reasoning_format="inline", model="student")
    gw = gateway(upstreams=upstream.base_url, api_keys="sk-st", access_log="")
    argv = [sys.executable, "-m", "schemathesis.cli", "run", gw.root_url + "/openapi.json"]
    argv += ["--checks", "not_a_server_error", "--max-examples", "50", "--seed", "1"]
    argv += ["--no-shrink", "--workers", "1", "-H", "Authorization: Bearer sk-st"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " 0 generated" not in result.stdout
    assert len(upstream.requests()) > 0  # valid requests reached the upstream
