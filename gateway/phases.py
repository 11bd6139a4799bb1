"""The two-phase runner: a reasoning budget and/or an answer constrained to labels, over any
function that makes one upstream chat call.

* Phase 1 reasons: ``stop: ["</think>"]``; with a budget it starts from the assistant prefix
  ``<think>\\n`` (so every generated token is reasoning) with ``max_tokens`` = the budget.
* Phase 2 answers: it continues the assistant prefix ``<think>\\n…\\n</think>\\n\\n``
  (``continue_final_message: true, add_generation_prompt: false``; vLLM's prefix cache makes
  re-reading phase 1 cheap), with ``structured_outputs: {"choice": labels}`` when the task is
  known. A budget of 0 (``none``) starts here, after an empty think section.

The client sees one response as if the model had written ``<think>\\n…\\n</think>\\n\\n<answer>``
in one go, so the think modes shape it as usual. ``usage`` adds both phases (phase 2's prompt
re-reads phase 1); ``reasoning_tokens`` is what phase 1 generated. This module knows nothing
about HTTP: :func:`run_whole` takes ``complete(body) -> completion``, :func:`run_stream` takes
``events(body) -> async iterator of chunk dicts`` (ending at ``[DONE]``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from distill_common.think import THINK_CLOSE, THINK_OPEN
from gateway.budget import Plan

Complete = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Events = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]
OPEN = THINK_OPEN + "\n"
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
_REASONING_KEYS = ("reasoning_content", "reasoning")


@dataclass
class Report:
    """What happened, for the metrics: the budget, whether phase 1 hit it, why the answer
    was forced (``budget``, ``none``, ``unclosed``; ``None``: the model closed its think
    section itself), whether the answer was constrained, reasoning tokens spent."""

    budget: int | None
    hit: bool = False
    forced: str | None = None
    constrained: bool = False
    reasoning_tokens: int = 0


def _client_max(base: dict[str, Any]) -> int | None:
    value = base.get("max_completion_tokens") or base.get("max_tokens")
    return value if isinstance(value, int) else None


def phase1_body(base: dict[str, Any], plan: Plan) -> tuple[dict[str, Any], bool]:
    """Phase 1's request, and whether its ``max_tokens`` is the budget (not the client's)."""
    # The client's stop strings and minimum length are about the answer: phase 2's.
    skip = ("stop", "include_stop_str_in_output", "min_tokens")
    body = {k: v for k, v in base.items() if k not in skip}
    body["stop"] = [THINK_CLOSE]
    body.pop("max_completion_tokens", None)
    limit = _client_max(base)
    by_budget = False
    if plan.budget is not None:
        by_budget = limit is None or plan.budget <= limit
        limit = plan.budget if by_budget else limit
        body["messages"] = [*base["messages"], {"role": "assistant", "content": OPEN}]
        body.update(CONTINUE)
    body.pop("max_tokens", None)
    if limit is not None:
        body["max_tokens"] = limit
    return body, by_budget


def phase2_body(base: dict[str, Any], plan: Plan, prefix: str, used: int) -> dict[str, Any]:
    """Phase 2's request: continue ``prefix``; the answer is one label when ``plan.labels``."""
    body = dict(base)
    body["messages"] = [*base["messages"], {"role": "assistant", "content": prefix}]
    body.update(CONTINUE)
    limit = _client_max(base)
    body.pop("max_completion_tokens", None)
    body.pop("max_tokens", None)
    if plan.labels is not None:
        body["structured_outputs"] = {"choice": list(plan.labels)}
        for key in ("min_tokens", "ignore_eos"):  # the grammar ends the answer, and bounds it
            body.pop(key, None)
    elif limit is not None:
        body["max_tokens"] = max(limit - used, 1)
    return body


def close_text(text: str) -> str:
    """What closes a think section whose text so far (from its open tag) is ``text``."""
    if text.endswith("\n") and text.strip() != THINK_OPEN:
        return THINK_CLOSE + "\n\n"
    return "\n" + THINK_CLOSE + "\n\n"


def _forced(plan: Plan, finish: str | None, stop_reason: Any, hit: bool) -> str | None:
    if plan.budget == 0:
        return "none"
    if hit:
        return "budget"
    if finish == "stop" and stop_reason in (THINK_CLOSE, "missing"):
        return None  # the model closed its think section itself
    return "unclosed"


class _Phase1:
    """Phase 1's text and ending, as the two ways of running it see them."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.prefilled = plan.budget is not None and plan.budget > 0
        self.parts: list[str] = []
        self.finish: str | None = None
        self.stop_reason: Any = "missing"
        self.usage: dict[str, Any] | None = None

    def take(self, part: dict[str, Any]) -> None:
        """Text from a message or a delta (a reasoning field counts as think text)."""
        for key in _REASONING_KEYS:
            if isinstance(part.get(key), str):
                self.parts.append(part[key])
        if isinstance(part.get("content"), str):
            self.parts.append(part["content"])

    def end(self, choice: dict[str, Any]) -> None:
        self.finish = choice.get("finish_reason")
        self.stop_reason = choice.get("stop_reason", "missing")

    def texts(self) -> tuple[str, str, str]:
        """(the prefix phase 2 continues, the opening the gateway shows before phase 1's
        text, the closing it shows after it)."""
        text = "".join(self.parts)
        ours = self.prefilled or self.plan.budget == 0
        head = OPEN if ours or not text.lstrip().startswith(THINK_OPEN) else ""
        closing = close_text(head + text)
        return head + text + closing, OPEN if ours else "", closing

    def report(self, by_budget: bool) -> Report:
        hit = self.prefilled and by_budget and self.finish == "length"
        tokens = int((self.usage or {}).get("completion_tokens") or 0)
        return Report(
            budget=self.plan.budget,
            hit=hit,
            forced=_forced(self.plan, self.finish, self.stop_reason, hit),
            constrained=self.plan.labels is not None,
            reasoning_tokens=tokens,
        )


def add_usage(first: dict[str, Any] | None, second: dict[str, Any] | None, reasoning: int) -> Any:
    """Both phases' usage added up; ``reasoning_tokens`` = phase 1's completion tokens."""
    if second is None:
        return second
    out = dict(second)
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        out[key] = int((first or {}).get(key) or 0) + int(second.get(key) or 0)
    details = out.get("completion_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    details["reasoning_tokens"] = reasoning
    out["completion_tokens_details"] = details
    return out


async def run_whole(
    plan: Plan, base: dict[str, Any], complete: Complete, done: Callable[[Report], None]
) -> dict[str, Any]:
    """Both phases, not streamed: one completion, as if the model wrote it in one go."""
    p1 = _Phase1(plan)
    by_budget = False
    first: dict[str, Any] | None = None
    if plan.budget != 0:
        body1, by_budget = phase1_body(base, plan)
        first = await complete(body1)
        choice = (first.get("choices") or [{}])[0]
        p1.take(choice.get("message") or {})
        p1.end(choice)
        p1.usage = first.get("usage")
    report = p1.report(by_budget)
    prefix, head, closing = p1.texts()
    second = await complete(phase2_body(base, plan, prefix, report.reasoning_tokens))
    shown = head + "".join(p1.parts) + closing
    for choice in second.get("choices") or []:
        message = choice.get("message")
        if isinstance(message, dict):
            message["content"] = shown + (message.get("content") or "")
            if first is not None:
                _join_logprobs(choice, (first.get("choices") or [{}])[0])
    if first is not None:
        for key in ("id", "created"):
            if key in first:
                second[key] = first[key]
    second["usage"] = add_usage(p1.usage, second.get("usage"), report.reasoning_tokens)
    done(report)
    return second


def _join_logprobs(choice: dict[str, Any], first: dict[str, Any]) -> None:
    a, b = first.get("logprobs"), choice.get("logprobs")
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return
    if isinstance(a.get("content"), list) and isinstance(b.get("content"), list):
        choice["logprobs"] = {**b, "content": a["content"] + b["content"]}


class _Envelope:
    """The chunk fields every event of the combined stream shares (phase 1's id)."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] | None = None
        self.role_sent = False

    def adopt(self, event: dict[str, Any]) -> None:
        if self.fields is None:
            self.fields = {k: event[k] for k in ("id", "object", "created", "model") if k in event}
        else:
            event.update(self.fields)

    def text(self, content: str) -> dict[str, Any]:
        """A chunk of text the gateway adds (the think section's opening or closing)."""
        delta: dict[str, Any] = {"content": content}
        if not self.role_sent:
            delta = {"role": "assistant", **delta}
            self.role_sent = True
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**(self.fields or {"object": "chat.completion.chunk"}), "choices": [choice]}

    def strip_role(self, event: dict[str, Any]) -> bool:
        """Drop a repeated role; False when nothing is left worth sending."""
        keep = event.get("usage") is not None
        for choice in event.get("choices") or ():
            delta = choice.get("delta")
            if isinstance(delta, dict) and "role" in delta:
                if self.role_sent:
                    del delta["role"]
                self.role_sent = True
            if choice.get("finish_reason") is not None or (
                isinstance(delta, dict) and any(v not in (None, "") for v in delta.values())
            ):
                keep = True
        return keep


def _is_error(event: dict[str, Any]) -> bool:
    return "error" in event or event.get("object") == "error"


async def run_stream(
    plan: Plan, base: dict[str, Any], events: Events, done: Callable[[Report], None]
) -> AsyncIterator[dict[str, Any]]:
    """Both phases, streamed: the chunks of one stream (``[DONE]`` is the caller's). An
    error event from the upstream ends it there (without ``[DONE]``)."""
    p1 = _Phase1(plan)
    env = _Envelope()
    by_budget = False
    if plan.budget != 0:
        body1, by_budget = phase1_body(base, plan)
        first = True
        async for event in events(body1):
            if _is_error(event):
                yield event
                return
            env.adopt(event)
            if first and p1.prefilled:
                yield env.text(OPEN)
            first = False
            usage = event.pop("usage", None)
            p1.usage = usage or p1.usage
            for choice in event.get("choices") or ():
                p1.take(choice.get("delta") or {})
                if choice.get("finish_reason") is not None:
                    p1.end(choice)
                    choice["finish_reason"] = None
                    choice.pop("stop_reason", None)
            if env.strip_role(event):
                yield event
        if p1.finish is None:
            return  # the upstream ended phase 1 early: the caller reports it
    report = p1.report(by_budget)
    prefix, head, closing = p1.texts()
    pending: str | None = head + closing if plan.budget == 0 else closing
    async for event in events(phase2_body(base, plan, prefix, report.reasoning_tokens)):
        if _is_error(event):
            yield event
            return
        env.adopt(event)
        if pending is not None:
            yield env.text(pending)
            pending = None
        if event.get("usage") is not None:
            event["usage"] = add_usage(p1.usage, event["usage"], report.reasoning_tokens)
        if env.strip_role(event):
            yield event
    done(report)
