"""Reasoning budgets and label-constrained answers through the real gateway in front of a real
vLLM (CPU build) serving the tiny student, with the official ``openai`` SDK."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import orjson
import pytest

from distill_common.task import load_task
from distill_common.think import split_think
from tests.conftest import NEWS_TASK
from tests.fixtures_vllm import news_rows
from tests.test_gateway_vllm import GENERATED, Generation, _settled, vllm_metric

pytestmark = pytest.mark.slow

TASK = load_task(NEWS_TASK)
GREEDY = {"temperature": 0, "max_tokens": 96, "seed": 0}
NEVER_CLOSES = {"bad_words": ["</think>"]}  # a student that never ends its think section


@pytest.fixture(scope="module")
def question() -> list[dict]:
    return list(TASK.messages({"id": "q", "title": "国足客场二比一逆转取胜,晋级亚洲杯八强"}))


@pytest.fixture(scope="module")
def direct(vllm_server, question) -> str:
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key="none")
    out = client.chat.completions.create(model=vllm_server.model, messages=question, **GREEDY)
    return out.choices[0].message.content


@pytest.fixture
def task_gateway(gateway, vllm_server):
    """A gateway that knows the student's task."""
    return gateway(upstreams=vllm_server.base_url, tasks={vllm_server.model: NEWS_TASK})


def ask(gw, model: str, messages: list[dict], stream: bool, **extra) -> tuple[str, str, str, dict]:
    """(reasoning, answer, finish_reason, usage) of one request through the SDK."""
    client = openai.OpenAI(base_url=gw.base_url, api_key="none", max_retries=0)
    kw = {"model": model, "messages": messages, **GREEDY, "extra_body": extra}
    if not stream:
        out = client.chat.completions.create(**kw)
        message = out.choices[0].message
        reasoning = (message.model_extra or {}).get("reasoning_content") or ""
        return reasoning, message.content, out.choices[0].finish_reason, out.usage.model_dump()
    reasoning, answer, finish, usage = [], [], None, None
    chunks = client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    for chunk in chunks:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
            answer.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(reasoning), "".join(answer), finish, usage.model_dump()


def token_count(server, text: str) -> int:
    body = {"model": server.model, "prompt": text, "add_special_tokens": False}
    return httpx.post(server.root_url + "/tokenize", json=body, timeout=10).json()["count"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_budget_hit_mid_think_cuts_the_reasoning_and_answers_a_label(
    task_gateway, vllm_server, question, direct, stream
):
    budget = 6
    natural = split_think(direct).reasoning
    assert token_count(vllm_server, natural) > budget + 2, "the student must think longer"
    reasoning, answer, finish, usage = ask(
        task_gateway, vllm_server.model, question, stream, max_reasoning_tokens=budget
    )
    assert natural.startswith(reasoning)  # the student's own reasoning, cut
    assert abs(token_count(vllm_server, reasoning) - budget) <= 1
    assert answer in TASK.labels and finish == "stop"
    assert usage["completion_tokens_details"]["reasoning_tokens"] == budget
    assert 'gateway_reasoning_budget_hits_total{model="student"} 1.0' in task_gateway.metrics()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_effort_none_answers_a_label_without_reasoning(task_gateway, vllm_server, question, stream):
    reasoning, answer, finish, usage = ask(
        task_gateway, vllm_server.model, question, stream, reasoning_effort="none"
    )
    assert reasoning == "" and answer in TASK.labels and finish == "stop"
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_student_that_never_closes_its_think_section_answers_a_label_under_a_budget(
    task_gateway, vllm_server, question, stream
):
    reasoning, answer, finish, _ = ask(
        task_gateway, vllm_server.model, question, stream, max_reasoning_tokens=24, **NEVER_CLOSES
    )
    assert reasoning and answer in TASK.labels and finish == "stop"
    client = openai.OpenAI(base_url=vllm_server.base_url, api_key="none")
    alone = client.chat.completions.create(  # the same student without the gateway's help
        model=vllm_server.model, messages=question, **GREEDY, extra_body=NEVER_CLOSES
    )
    assert not split_think(alone.choices[0].message.content).closed


def test_every_held_out_answer_is_a_label_streamed_and_not_even_at_budget_0(
    task_gateway, vllm_server
):
    rows = [r for r in news_rows() if r.get("split") == "test"]
    assert len(rows) == 90
    cases = [(row, stream, budget) for row in rows for stream, budget in
             ((False, None), (True, None), (False, 0), (True, 0), (True, 4))]  # fmt: skip

    def one(case) -> str:
        row, stream, budget = case
        extra = {} if budget is None else {"max_reasoning_tokens": budget}
        return ask(task_gateway, vllm_server.model, TASK.messages(row), stream, **extra)[1]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, cases))
    bad = [(c[0]["id"], c[1], c[2], a) for c, a in zip(cases, answers, strict=True)]
    assert [b for b in bad if b[3] not in TASK.labels] == []
    text = task_gateway.metrics()
    assert f'gateway_constrained_answers_total{{model="student"}} {len(cases)}.0' in text


def test_models_without_a_task_are_served_as_before(gateway, vllm_server, question, direct):
    """A gateway that knows another model's task (and injects prompts) serves the student,
    asked for nothing, exactly as a gateway with neither."""
    plain = gateway(upstreams=vllm_server.base_url)
    other = gateway(
        upstreams=vllm_server.base_url,
        tasks={"another-model": NEWS_TASK},
        inject_system_prompt=True,
    )
    bare = [question[1]]

    def seen(gw, messages, stream):  # (streamed reasoning tokens count vLLM's chunks: bursty)
        reasoning, answer, finish, usage = ask(gw, vllm_server.model, messages, stream)
        return reasoning, answer, finish, usage["prompt_tokens"], usage["completion_tokens"]

    for stream in (False, True):
        for messages in (question, bare):
            assert seen(other, messages, stream) == seen(plain, messages, stream)
    expected = split_think(direct)
    assert ask(other, vllm_server.model, question, False)[:2] == (
        expected.reasoning,
        expected.answer,
    )
    assert 'gateway_constrained_answers_total{model="student"}' not in other.metrics()


def test_injected_system_prompt_serves_a_bare_request_like_one_with_the_prompt(
    gateway, vllm_server, question
):
    gw = gateway(
        upstreams=vllm_server.base_url,
        tasks={vllm_server.model: NEWS_TASK},
        inject_system_prompt=True,
    )
    with_prompt = ask(gw, vllm_server.model, question, False, constrain_answer=False)
    bare = ask(gw, vllm_server.model, [question[1]], False, constrain_answer=False)
    assert bare == with_prompt and bare[3]["prompt_tokens"] > 100
    own = [{"role": "system", "content": "你好"}, question[1]]
    mine = ask(gw, vllm_server.model, own, False, constrain_answer=False)
    assert mine[3]["prompt_tokens"] < bare[3]["prompt_tokens"]  # the client's own prompt won
    assert 'gateway_system_prompts_injected_total{model="student"} 1.0' in gw.metrics()


# Hang-ups. Phase 1 is long when the student may not close its think section and the budget
# is large; phase 2 is long when it is not constrained and must write min_tokens. Budgets need
# n = 1, and one tiny sequence alone takes well under a second: a batch of other sequences,
# sent straight to vLLM and left to finish (a known number of tokens), slows every step to
# seconds per request. The client hangs up by time: vLLM CPU streams in bursts here, so a
# stream's text can arrive only at its end.
# As long as the tiny model's 2,048-token context allows after the ~150-token prompt: on a quiet
# machine a 1,500-token phase 2 could end before a 1.5 s hang-up reached vLLM.
LONG = 1800
HANG_UP_AFTER_S = {1: 0.5, 2: 1.0}  # phase 1 of a phase-2 test is 4 tokens
PHASES = {
    1: {"max_reasoning_tokens": LONG, "ignore_eos": True, **NEVER_CLOSES},
    2: {"max_reasoning_tokens": 4, "constrain_answer": False, "ignore_eos": True,
        "min_tokens": LONG},
}  # fmt: skip
BUSY_N, BUSY_TOKENS = 8, 1800
FINISHED = "vllm:request_success_total"


@pytest.mark.parametrize(
    ("stream", "phase"),
    [(False, 1), (False, 2), (True, 1), (True, 2)],
    ids=["whole-1", "whole-2", "stream-1", "stream-2"],
)
def test_a_hang_up_in_either_phase_aborts_the_upstream_request(
    gateway_process, vllm_server, question, stream, phase
):
    # The hang-up races a generation on 2 shared cores (a quiet machine can finish the phase
    # before the hang-up lands, a busy one can delay the hang-up past it): up to three tries,
    # each with every assertion; the test fails when no try shows the abort. The gateway runs
    # as its image runs it, in its own process: in the test session's process it shared an
    # interpreter that the full session at times holds up for seconds.
    gw = gateway_process(vllm_server.base_url, GATEWAY_TASKS=f"{vllm_server.model}={NEWS_TASK}")
    errors = []
    for _ in range(3):
        try:
            _hang_up_once(gw, vllm_server, question, stream, phase)
            return
        except AssertionError as e:
            errors.append(str(e).splitlines()[0])
    pytest.fail("no try aborted the upstream request: " + " | ".join(errors))


def _hang_up_once(gw, vllm_server, question, stream: bool, phase: int) -> None:
    import threading

    logged = len(gw.log_rows())  # the access log rows of earlier tries
    generation = Generation(vllm_server)
    lengths = vllm_metric(vllm_server, FINISHED, 'finished_reason="length"')
    direct = openai.OpenAI(base_url=vllm_server.base_url, api_key="none", max_retries=0)
    busy = threading.Thread(
        target=lambda: direct.chat.completions.create(
            model=vllm_server.model, messages=question, n=BUSY_N, max_tokens=BUSY_TOKENS,
            temperature=1.0, extra_body={"ignore_eos": True, "min_tokens": BUSY_TOKENS},
        )
    )  # fmt: skip
    busy.start()
    time.sleep(1.0)  # the batch is running
    body = {"model": vllm_server.model, "messages": question, "max_tokens": LONG + 4,
            "temperature": 0, "stream": stream, **PHASES[phase]}  # fmt: skip
    raw = orjson.dumps(body)
    port = int(gw.root_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(raw), raw)
        )
        if stream:  # a stream hangs up once it has begun (its head comes with phase 1's
            sock.settimeout(30)  # first event), as a client reading it would
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
            time.sleep(HANG_UP_AFTER_S[phase] - 0.5)
        else:
            time.sleep(HANG_UP_AFTER_S[phase])
    busy.join()
    generation.aborted(gw, after=logged)
    spent = _settled(vllm_server, GENERATED) - generation.tokens - BUSY_N * BUSY_TOKENS
    assert 0 < spent < LONG, f"{spent} tokens generated: phase {phase} was not aborted"
    # phase 1 ended at its budget (length) before phase 2 was aborted, or was aborted itself
    finished = lengths + BUSY_N + phase - 1  # each busy sequence ended by length too
    assert vllm_metric(vllm_server, FINISHED, 'finished_reason="length"') == finished


def test_eval_sweeps_budgets_through_the_gateway(task_gateway, vllm_server, tmp_path):
    """``distill eval --reasoning-budget none,4,unlimited`` against the gateway: every answer
    a label, reasoning held to each budget, and the curve written."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.fixtures_vllm import write_alpaca

    rows = [r for r in news_rows() if r.get("split") == "test"][:12]
    data = write_alpaca(TASK, rows, tmp_path / "data", name="test")
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "pipeline", "eval", "--data", str(data), "--out", str(out),
            "--task", str(NEWS_TASK), "--endpoint", f"gw={task_gateway.base_url}@student",
            "--max-tokens", "96", "--reasoning-budget", "none,4,unlimited"]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reasoning budget sweep" in done.stdout
    result = json.loads((out / "budget.json").read_text())
    assert result["budgets"] == ["none", "4", "unlimited"]
    none, four, unlimited = result["endpoints"]["gw"]
    assert all(p["label_rate"] == 1.0 and p["n"] == 12 for p in (none, four, unlimited))
    assert none["reasoning_tokens_mean"] == 0 and none["format_rate"] == 0  # no reasoning
    assert four["reasoning_tokens_mean"] == 4
    assert unlimited["reasoning_tokens_mean"] > 4 and unlimited["format_rate"] == 1.0
    assert (out / "budget.png").stat().st_size > 10_000
    assert (out / "budget-4" / "summary.json").exists()
