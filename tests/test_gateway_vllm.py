"""The gateway in front of a real vLLM (CPU build) serving the tiny student, through the
official ``openai`` SDK: all three think modes, streaming and not, ``n > 1``, and client
disconnects that must abort the generation inside vLLM."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from pipeline.think import split_think

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_tokens": 96, "seed": 0}


@pytest.fixture(scope="module")
def question(vllm_server) -> list[dict]:
    from pipeline.task import load_task
    from tests.conftest import NEWS_TASK

    task = load_task(NEWS_TASK)
    return list(task.messages({"id": "q", "title": "国足客场二比一逆转取胜,晋级亚洲杯八强"}))


@pytest.fixture(scope="module")
def direct(vllm_server, question) -> str:
    """The student's own text for the question, straight from vLLM (greedy)."""
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key="none")
    out = client.chat.completions.create(model=vllm_server.model, messages=question, **GREEDY)
    text = out.choices[0].message.content
    assert "</think>" in text, f"the tiny student should think first, wrote {text!r}"
    return text


def extra(obj) -> dict:
    return obj.model_extra or {}


def vllm_metric(server, name: str) -> float:
    text = httpx.get(server.root_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("mode", ["separate", "hide", "inline"])
def test_three_modes_through_the_sdk_with_real_vllm(gateway, vllm_server, question, direct, mode):
    expected = split_think(direct)
    gw = gateway(upstreams=vllm_server.base_url, think=mode)
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)

    whole = client.chat.completions.create(model=vllm_server.model, messages=question, **GREEDY)
    message = whole.choices[0].message
    reasoning, answer = [], []
    usage = None
    for chunk in client.chat.completions.create(
        model=vllm_server.model,
        messages=question,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            answer.append(choice.delta.content or "")
            reasoning.append(extra(choice.delta).get("reasoning_content") or "")
    streamed = ("".join(reasoning), "".join(answer))

    if mode == "separate":
        assert (extra(message)["reasoning_content"], message.content) == (
            expected.reasoning,
            expected.answer,
        )
        assert streamed == (expected.reasoning, expected.answer)
    elif mode == "hide":
        assert "reasoning_content" not in extra(message) and message.content == expected.answer
        assert streamed == ("", expected.answer)
    else:
        assert message.content == direct and streamed == ("", direct)
    assert whole.usage.completion_tokens_details.reasoning_tokens > 0
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens > 0
    assert usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens


def test_each_of_n_choices_is_split_on_its_own(gateway, vllm_server, question, direct):
    gw = gateway(upstreams=vllm_server.base_url)
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    parts: dict[int, tuple[list, list]] = {}
    # n > 1 is refused with temperature 0; top_k=1 keeps both choices greedy (= direct).
    sampled = {**GREEDY, "temperature": 1.0, "extra_body": {"top_k": 1}}
    for chunk in client.chat.completions.create(
        model=vllm_server.model, messages=question, stream=True, n=2, **sampled
    ):
        for choice in chunk.choices:
            r, a = parts.setdefault(choice.index, ([], []))
            r.append(extra(choice.delta).get("reasoning_content") or "")
            a.append(choice.delta.content or "")
    expected = split_think(direct)
    assert sorted(parts) == [0, 1]
    for r, a in parts.values():
        assert ("".join(r), "".join(a)) == (expected.reasoning, expected.answer)


def _wait_running(server, want: float, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vllm_metric(server, "vllm:num_requests_running") == want:
            return True
        time.sleep(0.1)
    return False


# 16 choices x 300 tokens, end of text ignored: longer than the client waits. (The prompt
# leaves room for 300 tokens in max-model-len 512.)
CHOICES, TOKENS = 16, 300
ASKED = CHOICES * TOKENS
LONG = {
    "max_tokens": TOKENS,
    "n": CHOICES,
    "temperature": 1.0,
    "extra_body": {"ignore_eos": True, "min_tokens": TOKENS},
}


def test_client_disconnect_aborts_the_generation_in_vllm(gateway, vllm_server, question):
    """A streaming client that hangs up must free its vLLM slot: the request stops running
    long before the tokens it asked for (ignore_eos) are generated."""
    gw = gateway(upstreams=vllm_server.base_url)
    generated = "vllm:generation_tokens_total"

    # Read a couple of chunks, then hang up. Whether the hang-up reaches vLLM in time was
    # seen to vary from run to run on this loaded machine (the gateway misses the closed
    # socket now and then; vLLM also misses some disconnects when called directly), so the
    # client gets three tries and one clean abort is required.
    spent = []
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    for _ in range(3):
        before = vllm_metric(vllm_server, generated)
        stream = client.chat.completions.create(
            model=vllm_server.model, messages=question, stream=True, **LONG
        )
        iterator = iter(stream)
        next(iterator)
        next(iterator)
        stream.close()
        assert _wait_running(vllm_server, 0, timeout=10), "vLLM kept generating"
        spent.append(vllm_metric(vllm_server, generated) - before)
        if spent[-1] < ASKED:
            break
    assert min(spent) < ASKED, f"never aborted: {spent} tokens of {ASKED}"
    statuses = [r["status"] for r in gw.log_rows()]
    assert 499 in statuses and statuses[-1] == 499


def test_upstream_metrics_and_ready_with_real_vllm(gateway, vllm_server, question, direct):
    gw = gateway(upstreams=vllm_server.base_url)
    assert httpx.get(gw.root_url + "/ready").status_code == 200
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    list(
        client.chat.completions.create(
            model=vllm_server.model, messages=question, stream=True, **GREEDY
        )
    )
    text = gw.metrics()
    assert (
        f'gateway_time_to_first_answer_token_seconds_count{{model="{vllm_server.model}"}} 1.0'
        in text
    )
    assert (
        f'gateway_time_to_first_reasoning_token_seconds_count{{model="{vllm_server.model}"}} 1.0'
        in text
    )
