"""Reasoning budgets, label-constrained answers and system-prompt injection, as logic: the
request fields, the budgets file, and the two-phase runner over a deterministic stand-in for
one upstream call (tokens are words; it honours ``max_tokens``, ``stop``, assistant-prefix
continuation and ``structured_outputs.choice`` the way vLLM does)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from distill_common.task import load_task
from distill_common.think import split_think
from gateway.budget import BudgetError, BudgetTable, Plan, plan_request
from gateway.phases import run_stream, run_whole
from gateway.planned import FeatureMetrics
from gateway.protocol import GatewayError
from gateway.sysprompt import inject_system_prompt
from tests.conftest import NEWS_TASK

TASK = load_task(NEWS_TASK)
USER = [{"role": "user", "content": "新闻分类:国足客场二比一逆转取胜"}]


class StubModel:
    """One upstream call: ``<think>``, ``\\n``, ``words`` reasoning tokens, then (if it
    ``closes``) ``\\n``, ``</think>``, ``\\n\\n`` and ``answer``. Records every body."""

    def __init__(self, words: int = 10, answer: str = "体育。", closes: bool = True) -> None:
        reasoning = [f"w{i} " for i in range(words)]
        tail = ["\n", "</think>", "\n\n", answer] if closes else [f"x{i} " for i in range(500)]
        self.tokens = ["<think>", "\n", *reasoning, *tail]
        self.bodies: list[dict] = []

    def generate(self, body: dict) -> tuple[list[str], str, str | None]:
        self.bodies.append(copy.deepcopy(body))
        last = body["messages"][-1]
        start = 0
        if body.get("continue_final_message"):
            assert last["role"] == "assistant" and body.get("add_generation_prompt") is False
            prefix = last["content"]
            if prefix.endswith("</think>\n\n"):  # the answer
                choice = (body.get("structured_outputs") or {}).get("choice")
                answer = self.tokens[-1] if self.tokens[-1] != "x499 " else "随便说说"
                out = [choice[0] if choice and answer not in choice else answer]
                return out, "stop", None
            start = len(prefix) and 2  # after "<think>\n"
        limit = body.get("max_tokens") or 10_000
        stops = body.get("stop") or []
        out: list[str] = []
        for token in self.tokens[start:]:
            if token in stops:
                return out, "stop", token
            if len(out) == limit:
                return out, "length", None
            out.append(token)
        return out, "stop", None

    def usage(self, body: dict, out: list[str]) -> dict:
        prompt = sum(len(m["content"]) for m in body["messages"])
        return {"prompt_tokens": prompt, "completion_tokens": len(out), "total_tokens": 0}

    async def complete(self, body: dict) -> dict:
        out, finish, stop_reason = self.generate(body)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(out)},
            "finish_reason": finish,
            "stop_reason": stop_reason,
        }
        return {"id": f"c{len(self.bodies)}", "choices": [choice], "usage": self.usage(body, out)}

    async def events(self, body: dict):
        out, finish, stop_reason = self.generate(body)
        base = {"id": f"s{len(self.bodies)}", "object": "chat.completion.chunk", "created": 1}

        def chunk(delta: dict, finish=None, **extra) -> dict:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, **extra}
            return {**base, "choices": [choice]}

        yield chunk({"role": "assistant", "content": ""})
        for token in out:
            yield chunk({"content": token})
        yield chunk({"content": ""}, finish, stop_reason=stop_reason)
        yield {**base, "choices": [], "usage": self.usage(body, out)}


def plan(budget: int | None, labels=tuple(TASK.labels)) -> Plan:
    return Plan(budget, labels, "test")


def whole(model: StubModel, p: Plan, **body) -> tuple[dict, list]:
    reports: list = []
    base = {"model": "student", "messages": USER, **body}
    out = asyncio.run(run_whole(p, base, model.complete, reports.append))
    return out, reports


def streamed(model: StubModel, p: Plan, **body) -> tuple[list[dict], list]:
    reports: list = []
    base = {"model": "student", "messages": USER, "stream": True, **body}

    async def go() -> list[dict]:
        return [e async for e in run_stream(p, base, model.events, reports.append)]

    return asyncio.run(go()), reports


def joined(events: list[dict]) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices") or ())


# --------------------------------------------------------------------------- request fields


def test_a_request_that_asks_for_nothing_has_no_plan_and_is_left_as_sent():
    body = {"model": "student", "messages": USER, "reasoning": {"exclude": True}}
    sent = copy.deepcopy(body)
    assert plan_request(body, BudgetTable(), None) is None
    assert body == sent


@pytest.mark.parametrize(
    ("fields", "budget", "source"),
    [
        ({"max_reasoning_tokens": 7, "reasoning": {"max_tokens": 9}}, 7, "max_reasoning_tokens"),
        ({"reasoning": {"max_tokens": 9, "effort": "low"}}, 9, "reasoning.max_tokens"),
        ({"reasoning": {"effort": "low"}, "reasoning_effort": "high"}, 16, "reasoning.effort"),
        ({"reasoning_effort": "HIGH"}, 64, "reasoning_effort"),
        ({"reasoning_effort": "none"}, 0, "none"),
        ({"reasoning": {"enabled": False}}, 0, "none"),
        ({"max_reasoning_tokens": 0}, 0, "none"),
        ({}, 32, "default"),
    ],
)
def test_budget_sources_in_order(tmp_path, fields, budget, source):
    path = tmp_path / "budgets.yaml"
    path.write_text(
        "defaults: {efforts: {minimal: 4}}\n"
        "models:\n  student: {efforts: {low: 16, high: 64}, default: 32}\n",
        encoding="utf-8",
    )
    body = {"model": "student", "messages": USER, **copy.deepcopy(fields)}
    got = plan_request(body, BudgetTable.load(path), None)
    assert got == Plan(budget, None, source)
    assert not {"max_reasoning_tokens", "reasoning_effort"} & set(body)


def test_budgets_file_levels_defaults_and_errors(tmp_path):
    table = BudgetTable.load(None)
    assert table.effort_budget("any", "none") == 0
    assert table.effort_budget("any", "high") > table.effort_budget("any", "low") > 0
    assert table.default_budget("any") is None
    path = tmp_path / "budgets.yaml"
    path.write_text("defaults: {efforts: {low: 3}, default: low}\n", encoding="utf-8")
    assert BudgetTable.load(path).default_budget("other") == 3
    path.write_text("models:\n  student: {efforts: {extreme: 3}}\n", encoding="utf-8")
    with pytest.raises(BudgetError, match=r"budgets.yaml: field 'models.student.efforts.extreme"):
        BudgetTable.load(path)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"max_reasoning_tokens": "8"}, "max_reasoning_tokens"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning": {"max_tokens": 1.5}}, "reasoning.max_tokens"),
        ({"reasoning": {"enabled": "no"}}, "reasoning.enabled"),
        ({"constrain_answer": "no", "reasoning_effort": "low"}, "constrain_answer"),
        ({"reasoning_effort": "low", "n": 2}, "n"),
    ],
)
def test_bad_fields_are_400_naming_the_field(fields, param):
    body = {"model": "student", "messages": USER, **fields}
    with pytest.raises(GatewayError) as err:
        plan_request(body, BudgetTable(), TASK)
    assert err.value.status == 400 and err.value.param == param
    assert param in err.value.message


def test_labels_when_the_task_is_known_unless_opted_out_or_own_constraint():
    def labels(**fields):
        got = plan_request({"model": "student", "messages": USER, **fields}, BudgetTable(), TASK)
        return got and got.labels

    assert labels() == tuple(TASK.labels)
    assert labels(constrain_answer=False) is None
    assert labels(constrain_answer=False, reasoning_effort="none") is None
    assert labels(structured_outputs={"regex": "x"}) is None
    assert labels(response_format={"type": "json_object"}) is None
    assert labels(response_format={"type": "text"}) == tuple(TASK.labels)
    assert plan_request({"model": "m", "messages": USER}, BudgetTable(), None) is None


# --------------------------------------------------------------------------- the runner


@pytest.mark.parametrize("labels", [tuple(TASK.labels), None])
def test_budget_hit_cuts_the_reasoning_and_the_answer_follows(labels):
    model = StubModel(words=10, answer="体育")
    out, [report] = whole(model, plan(4, labels), max_tokens=100, stop=["。"])
    choice = out["choices"][0]
    assert choice["message"]["content"] == "<think>\nw0 w1 w2 w3 \n</think>\n\n体育"
    assert choice["finish_reason"] == "stop"
    assert report.hit and report.forced == "budget" and report.reasoning_tokens == 4
    first, second = model.bodies
    assert first["max_tokens"] == 4 and first["stop"] == ["</think>"]
    assert first["messages"][-1] == {"role": "assistant", "content": "<think>\n"}
    assert second["messages"][-1]["content"] == "<think>\nw0 w1 w2 w3 \n</think>\n\n"
    assert second["stop"] == ["。"]  # the client's stop applies to the answer
    if labels:
        assert second["structured_outputs"] == {"choice": list(TASK.labels)}
        assert "max_tokens" not in second  # the grammar bounds the answer
    else:
        assert "structured_outputs" not in second and second["max_tokens"] == 96
    usage = out["usage"]
    assert usage["completion_tokens"] == 4 + 1
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 4
    assert usage["prompt_tokens"] == sum(
        sum(len(m["content"]) for m in b["messages"]) for b in model.bodies
    )
    assert out["id"] == "c1"  # phase 1's id


def test_a_budget_the_model_stays_under_is_not_a_hit():
    model = StubModel(words=3)
    out, [report] = whole(model, plan(50))
    assert split_think(out["choices"][0]["message"]["content"]).reasoning == "w0 w1 w2"
    assert not report.hit and report.forced is None and report.reasoning_tokens == 4


def test_none_answers_after_an_empty_think_section_in_one_call():
    model = StubModel(answer="体育")
    out, [report] = whole(model, plan(0))
    assert out["choices"][0]["message"]["content"] == "<think>\n\n</think>\n\n体育"
    assert len(model.bodies) == 1 and report.forced == "none" and report.reasoning_tokens == 0
    assert model.bodies[0]["messages"][-1]["content"] == "<think>\n\n</think>\n\n"


def test_no_budget_with_labels_keeps_the_models_own_think_section_and_constrains():
    model = StubModel(words=3, answer="体育 我觉得")  # rambles after its label
    out, [report] = whole(model, plan(None), max_tokens=64)
    text = out["choices"][0]["message"]["content"]
    assert text == "<think>\nw0 w1 w2 \n</think>\n\n民生"  # the first label: not what it said
    first, second = model.bodies
    assert first["messages"] == USER and "continue_final_message" not in first
    assert first["max_tokens"] == 64 and first["stop"] == ["</think>"]
    assert second["messages"][-1]["content"] == "<think>\nw0 w1 w2 \n</think>\n\n"
    assert report.forced is None and not report.hit and report.constrained


def test_a_model_that_never_closes_its_think_section_still_answers_a_label():
    model = StubModel(closes=False)
    out, [report] = whole(model, plan(6))
    parts = split_think(out["choices"][0]["message"]["content"])
    assert parts.closed and TASK.read_label(parts.answer) == parts.answer
    assert report.hit and report.forced == "budget"
    model = StubModel(closes=False)
    out, [report] = whole(model, plan(None), max_tokens=20)  # cut by the client's max_tokens
    assert split_think(out["choices"][0]["message"]["content"]).answer in TASK.labels
    assert not report.hit and report.forced == "unclosed"


@pytest.mark.parametrize("budget", [0, 4, 50, None])
def test_the_stream_says_what_the_whole_response_says(budget):
    out, [w_report] = whole(StubModel(words=10), plan(budget))
    events, [s_report] = streamed(StubModel(words=10), plan(budget))
    assert joined(events) == out["choices"][0]["message"]["content"]
    assert w_report == s_report
    roles = [c for e in events for c in e["choices"] if "role" in c["delta"]]
    finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(roles) == 1 and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert finishes == ["stop"]
    assert {e["id"] for e in events} == {events[0]["id"]}
    usages = [e["usage"] for e in events if e.get("usage")]
    assert len(usages) == 1 and usages[0] == out["usage"]


def test_an_upstream_error_event_ends_the_stream_without_a_report():
    async def failing(body):
        yield {"error": {"message": "boom"}}

    async def go():
        return [e async for e in run_stream(plan(4), {"messages": USER}, failing, reports.append)]

    reports: list = []
    assert asyncio.run(go()) == [{"error": {"message": "boom"}}] and reports == []


def test_metrics_observe_hits_forced_ratio_and_constraint():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    metrics = FeatureMetrics(registry)
    for budget in (4, 50, 0):
        _, [report] = whole(StubModel(words=10), plan(budget))
        metrics.observe("student", report)
    text = generate_latest(registry).decode()
    assert 'gateway_reasoning_budget_hits_total{model="student"} 1.0' in text
    assert 'gateway_forced_answers_total{model="student",reason="budget"} 1.0' in text
    assert 'gateway_forced_answers_total{model="student",reason="none"} 1.0' in text
    assert 'gateway_constrained_answers_total{model="student"} 3.0' in text
    assert 'gateway_reasoning_budget_used_ratio_count{model="student"} 2.0' in text
    assert 'gateway_reasoning_budget_used_ratio_bucket{le="0.25",model="student"} 1.0' in text


# --------------------------------------------------------------------------- system prompt


def test_system_prompt_injected_only_when_the_client_sends_none():
    body = {"messages": list(USER)}
    assert inject_system_prompt(body, TASK)
    assert body["messages"] == [{"role": "system", "content": TASK.system_prompt}, *USER]
    for role in ("system", "developer"):
        own = {"messages": [{"role": role, "content": "mine"}, *USER]}
        assert not inject_system_prompt(own, TASK)
        assert own["messages"][0] == {"role": role, "content": "mine"}
