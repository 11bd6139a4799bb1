"""Think modes: what the client sees of the reasoning (separate, hide, inline).

The text rules themselves live in :mod:`distill_common.think`; this module applies them to OpenAI
request and response bodies, whole or streamed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from distill_common.think import (
    THINK_CLOSE,
    THINK_OPEN,
    ThinkStreamSplitter,
    join_reasoning,
    split_think,
)
from gateway.protocol import ChatCompletionRequest, GatewayError
from gateway.settings import THINK_MODES
from gateway.tokens import ESTIMATE, TokenCounter

UPSTREAM_REASONING = ("reasoning_content", "reasoning")
GATEWAY_ONLY = ("include_reasoning", "reasoning")


def resolve_mode(default: str, header: str | None, req: ChatCompletionRequest) -> str:
    """The think mode for one request: header ``X-Think`` > body options > settings."""
    if header is not None:
        mode = header.strip().lower()
        if mode not in THINK_MODES:
            raise GatewayError(
                400,
                f"X-Think must be one of {', '.join(THINK_MODES)}, not {header!r}",
                param="X-Think",
                code="invalid_think_mode",
            )
        return mode
    hide = req.include_reasoning is False or (
        req.reasoning is not None and req.reasoning.exclude is True
    )
    if hide:
        return "hide"
    show = req.include_reasoning is True or (
        req.reasoning is not None and req.reasoning.exclude is False
    )
    if show and default == "hide":
        return "separate"
    return default


def _strip_text(text: str) -> str:
    if THINK_CLOSE in text or text.lstrip().startswith(THINK_OPEN):
        return split_think(text).answer
    return text


def strip_reasoning(message: dict[str, Any]) -> None:
    """Remove the reasoning from an earlier assistant turn (fields and inline think)."""
    for name in UPSTREAM_REASONING:
        message.pop(name, None)
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = _strip_text(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] = _strip_text(part["text"])


def upstream_body(body: dict[str, Any], *, strip_history: bool) -> bytes:
    """The request as the upstream gets it: gateway-only fields removed, usage requested
    when streaming, earlier reasoning stripped."""
    for name in GATEWAY_ONLY:
        body.pop(name, None)
    if body.get("stream"):
        options = body.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        body["stream_options"] = options
    if strip_history:
        for message in body["messages"]:
            if message.get("role") == "assistant":
                strip_reasoning(message)
    return orjson.dumps(body)


def _set_reasoning(target: dict[str, Any], field_mode: str, reasoning: str | None) -> None:
    if field_mode in ("reasoning_content", "both"):
        target["reasoning_content"] = reasoning
    if field_mode in ("reasoning", "both"):
        target["reasoning"] = reasoning


def _pop_upstream_reasoning(target: dict[str, Any]) -> tuple[bool, str | None]:
    """Remove the upstream's reasoning fields; return (were any there, their text)."""
    if "reasoning_content" not in target and "reasoning" not in target:
        return False, None
    found = False
    text = None
    for name in UPSTREAM_REASONING:
        if name in target:
            value = target.pop(name)
            if value is not None:
                found = True
                text = value if text is None else text
    return found, text


@dataclass
class Outcome:
    """What the metrics and the access log need to know about one response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    anomalies: list[str] = field(default_factory=list)
    first_reasoning: float | None = None
    first_answer: float | None = None


def _count_tokens(
    outcome: Outcome,
    usage: dict[str, Any],
    counter: TokenCounter,
    texts: Sequence[tuple[str, str]],
) -> None:
    """Read the upstream's usage into ``outcome`` and fill its ``reasoning_tokens``: the
    upstream's own figure if it sent one, else the counter's split of ``completion_tokens``."""
    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion = outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("completion_tokens_details")
    given = details.get("reasoning_tokens") if isinstance(details, dict) else None
    if given is not None:
        outcome.reasoning_tokens = int(given)
        outcome.answer_tokens = max(completion - outcome.reasoning_tokens, 0)
        return
    outcome.reasoning_tokens, outcome.answer_tokens = counter.split(completion, texts)
    details = dict(details) if isinstance(details, dict) else {}
    details["reasoning_tokens"] = outcome.reasoning_tokens
    usage["completion_tokens_details"] = details


def shape_completion(
    data: dict[str, Any],
    mode: str,
    field_mode: str,
    started_in_think: bool,
    counter: TokenCounter = ESTIMATE,
) -> Outcome:
    """Rewrite a whole (non-streamed) completion in place for ``mode``.

    No reasoning is ``null`` in the reasoning field(s) (never ``""``); an empty answer is
    ``""``. Reasoning/answer tokens come from ``counter`` (see :mod:`gateway.tokens`); an
    upstream ``reasoning_tokens`` wins.
    """
    outcome = Outcome()
    texts: list[tuple[str, str]] = []
    for choice in data.get("choices") or []:
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        raw = message.get("content")
        content = raw or ""
        split_upstream, upstream_reasoning = _pop_upstream_reasoning(message)
        if split_upstream:  # never parse twice
            reasoning, answer = upstream_reasoning or "", content
            inline = join_reasoning(reasoning, content)
        else:
            parts = split_think(content, started_in_think=started_in_think)
            reasoning, answer, inline = parts.reasoning or "", parts.answer, content
            outcome.anomalies += parts.anomalies
        texts.append((reasoning, answer))
        if mode == "inline":
            message["content"] = inline
        else:
            # null only beside tool calls, as the upstream sent it
            tool_null = raw is None and not answer and "tool_calls" in message
            message["content"] = None if tool_null else answer
            if mode == "separate":
                _set_reasoning(message, field_mode, reasoning or None)
    usage = data.get("usage")
    if isinstance(usage, dict):
        _count_tokens(outcome, usage, counter, texts)
    return outcome


class _ChoiceStream:
    """Per-choice streaming state (``n > 1`` choices each get their own)."""

    __slots__ = (
        "answer",
        "closed_inline",
        "finished",
        "opened_inline",
        "reasoning",
        "splitter",
        "upstream_split",
    )

    def __init__(self, started_in_think: bool) -> None:
        self.splitter = ThinkStreamSplitter(started_in_think=started_in_think)
        self.upstream_split = False
        self.opened_inline = False
        self.closed_inline = False
        self.finished = False
        # The text seen, for the token counts at the end (joined once, then).
        self.reasoning: list[str] = []
        self.answer: list[str] = []


class StreamShaper:
    """Rewrites upstream SSE events for ``mode``; call :meth:`event` per ``data:`` payload.

    No reasoning means no reasoning delta at all (never ``""``); the role delta keeps its
    ``content`` (see :meth:`_shape_choice`). The usage chunk gets ``reasoning_tokens``
    from ``counter`` over the whole texts, as :func:`shape_completion` computes it.
    """

    def __init__(
        self,
        mode: str,
        field_mode: str,
        started_in_think: bool,
        *,
        client_wants_usage: bool,
        t0: float,
        counter: TokenCounter = ESTIMATE,
    ) -> None:
        self.mode = mode
        self.field_mode = field_mode
        self.started_in_think = started_in_think
        self.client_wants_usage = client_wants_usage
        self.t0 = t0
        self.counter = counter
        self.choices: dict[int, _ChoiceStream] = {}
        self.outcome = Outcome()
        self.finished = False

    def _choice(self, index: int) -> _ChoiceStream:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _ChoiceStream(self.started_in_think)
        return state

    def event(self, payload: bytes) -> bytes | None:
        """One upstream ``data:`` payload in, the SSE bytes to send out (or None)."""
        if payload == b"[DONE]":
            self.finished = True
            return None
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise GatewayError(
                502, "the model server sent a malformed stream event", code="bad_response"
            ) from None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk or chunk.get("object") == "error":
            return b"data: " + orjson.dumps(_error_event(chunk)) + b"\n\n"
        changed = False
        choices = chunk.get("choices") or ()
        kept = []
        for choice in choices:
            keep, touched = self._shape_choice(choice)
            changed |= touched or not keep
            if keep:
                kept.append(choice)
        usage = chunk.get("usage")
        if usage:
            self._usage(usage, final=not choices)
            changed = True
            if not self.client_wants_usage:
                if not kept:
                    return None
                del chunk["usage"]
        elif not kept:
            return None
        if not changed:
            return b"data: " + payload + b"\n\n"
        if len(kept) != len(choices):
            chunk["choices"] = kept
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _usage(self, usage: Any, *, final: bool) -> None:
        """Count the tokens at the stream's usage: the usage-only chunk that ends it, or
        usage sent with the last choice's finish."""
        if not isinstance(usage, dict):
            return
        states = self.choices.values()
        if not final and not all(state.finished for state in states):
            # Mid-stream usage (vLLM's continuous_usage_stats): totals so far, not split.
            self.outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.outcome.completion_tokens = int(usage.get("completion_tokens") or 0)
            return
        texts = [("".join(s.reasoning), "".join(s.answer)) for s in states]
        _count_tokens(self.outcome, usage, self.counter, texts)

    def _shape_choice(self, choice: dict[str, Any]) -> tuple[bool, bool]:
        """Rewrite one streamed choice in place; return (send it, was it changed)."""
        state = self._choice(choice.get("index", 0))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        finish = choice.get("finish_reason")
        split_here, upstream_reasoning = _pop_upstream_reasoning(delta)
        content = delta.get("content")
        if split_here or state.upstream_split:
            state.upstream_split = True
            reasoning, answer = upstream_reasoning or "", content or ""
        else:
            splitter = state.splitter
            reasoning = answer = ""
            if content:
                reasoning, answer = splitter.feed(content)
            if finish is not None:
                r, a = splitter.finish()
                reasoning += r
                answer += a
                self.outcome.anomalies += splitter.anomalies
        if finish is not None:
            state.finished = True
        outcome = self.outcome
        if reasoning:
            state.reasoning.append(reasoning)
            if outcome.first_reasoning is None:
                outcome.first_reasoning = time.perf_counter() - self.t0
        if answer:
            state.answer.append(answer)
            if outcome.first_answer is None:
                outcome.first_answer = time.perf_counter() - self.t0
        # The role delta (each choice's first) keeps a ``content``, "" until there is answer
        # text, as OpenAI and vLLM send it: a client that joins the deltas then gets "" for
        # an empty answer, as in a whole response.
        first = "role" in delta
        if self.mode == "inline":
            if not state.upstream_split:
                return True, False  # the text as the model wrote it
            text = ""
            if reasoning:
                text = reasoning if state.opened_inline else THINK_OPEN + "\n" + reasoning
                state.opened_inline = True
            if answer:
                if state.opened_inline and not state.closed_inline:
                    text += "\n" + THINK_CLOSE + "\n\n"
                    state.closed_inline = True
                text += answer
            new_delta: dict[str, Any] = {"content": text} if text or first else {}
        else:
            new_delta = {"content": answer} if answer or first else {}
            if self.mode == "separate" and reasoning:
                _set_reasoning(new_delta, self.field_mode, reasoning)
        if first and content is None and "tool_calls" in delta and not new_delta["content"]:
            new_delta["content"] = None  # a tool call's null, as the upstream sent it
        if "role" in delta:
            new_delta = {"role": delta["role"], **new_delta}
        if "tool_calls" in delta:
            new_delta["tool_calls"] = delta["tool_calls"]
        choice["delta"] = new_delta
        return bool(new_delta) or finish is not None, True


def _error_event(chunk: dict[str, Any]) -> dict[str, Any]:
    error = chunk.get("error")
    if isinstance(error, dict) and "message" in error:
        return {"error": {"type": "upstream_error", "param": None, "code": None, **error}}
    message = chunk.get("message") or str(error or "upstream error")
    return {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}}
