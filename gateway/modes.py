"""Think modes: what the client sees of the reasoning (separate, hide, inline).

The text rules themselves live in :mod:`distill_common.think`; this module applies them to OpenAI
request and response bodies, whole or streamed.
"""

from __future__ import annotations

import time
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

UPSTREAM_REASONING = ("reasoning_content", "reasoning")
_SLOW = object()  # a fast path declined: take the general one
_CONTENT_KEY = b'"delta":{"content":'
_CONTENT_LEN = len(_CONTENT_KEY)
_BRACE = ord("}")
_ENVELOPE_TRIES = 8  # chunks looked at for a plain content chunk before giving up
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


def _add_reasoning_tokens(usage: dict[str, Any], reasoning_tokens: int) -> None:
    details = usage.get("completion_tokens_details")
    details = dict(details) if isinstance(details, dict) else {}
    if details.get("reasoning_tokens") is None:
        details["reasoning_tokens"] = reasoning_tokens
    usage["completion_tokens_details"] = details


@dataclass
class Outcome:
    """What the metrics and the access log need to know about one response."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    anomalies: list[str] = field(default_factory=list)
    first_reasoning: float | None = None
    first_answer: float | None = None

    @property
    def answer_tokens(self) -> int:
        return max(self.completion_tokens - self.reasoning_tokens, 0)


def _read_usage(outcome: Outcome, usage: Any) -> None:
    if isinstance(usage, dict):
        outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        outcome.completion_tokens = int(usage.get("completion_tokens") or 0)


def shape_completion(
    data: dict[str, Any], mode: str, field_mode: str, started_in_think: bool
) -> Outcome:
    """Rewrite a whole (non-streamed) completion in place for ``mode``.

    The reasoning token count is estimated from the character share of the reasoning in the
    completion (vLLM reports only the total); an upstream figure, if any, wins.
    """
    outcome = Outcome()
    reasoning_chars = total_chars = 0
    for choice in data.get("choices") or []:
        message = choice.get("message")
        if not isinstance(message, dict):
            continue
        content = message.get("content") or ""
        split_upstream, upstream_reasoning = _pop_upstream_reasoning(message)
        if split_upstream:  # never parse twice
            reasoning, answer = upstream_reasoning, content
            inline = join_reasoning(reasoning, content)
        else:
            parts = split_think(content, started_in_think=started_in_think)
            reasoning, answer, inline = parts.reasoning, parts.answer, content
            outcome.anomalies += parts.anomalies
        reasoning_chars += len(reasoning or "")
        total_chars += len(reasoning or "") + len(answer)
        if mode == "inline":
            message["content"] = inline
        else:
            message["content"] = answer
            if mode == "separate":
                _set_reasoning(message, field_mode, reasoning)
    usage = data.get("usage")
    _read_usage(outcome, usage)
    if total_chars:
        outcome.reasoning_tokens = round(outcome.completion_tokens * reasoning_chars / total_chars)
    if isinstance(usage, dict):
        _add_reasoning_tokens(usage, outcome.reasoning_tokens)
        details = usage["completion_tokens_details"]
        outcome.reasoning_tokens = int(details.get("reasoning_tokens") or 0)
    return outcome


class _Envelope:
    """The bytes around the delta of a stream's plain content chunks: ``head`` +
    ``"delta":{...}`` + ``tail``, checked once by parsing (see ``_learn_envelope``)."""

    __slots__ = ("head", "head_len", "index", "prefix", "suffix", "tail", "tail_len")

    def __init__(self, head: bytes, tail: bytes, index: int) -> None:
        self.head = head
        self.tail = tail
        self.index = index
        self.head_len = len(head)
        self.tail_len = len(tail) + 1  # with the delta's closing brace
        self.prefix = b"data: " + head + b'"delta":'
        self.suffix = tail + b"\n\n"


class _ChoiceStream:
    """Per-choice streaming state (``n > 1`` choices each get their own)."""

    __slots__ = ("closed_inline", "opened_inline", "reasoning_chunks", "splitter", "upstream_split")

    def __init__(self, started_in_think: bool) -> None:
        self.splitter = ThinkStreamSplitter(started_in_think=started_in_think)
        self.upstream_split = False
        self.reasoning_chunks = 0
        self.opened_inline = False
        self.closed_inline = False


class StreamShaper:
    """Rewrites upstream SSE events for ``mode``; call :meth:`event` per ``data:`` payload.

    Reasoning tokens are counted as the upstream chunks that carried reasoning (vLLM sends
    one chunk per token), capped by the completion tokens the upstream reports.
    """

    def __init__(
        self,
        mode: str,
        field_mode: str,
        started_in_think: bool,
        *,
        client_wants_usage: bool,
        t0: float,
    ) -> None:
        self.mode = mode
        self.field_mode = field_mode
        self.started_in_think = started_in_think
        self.client_wants_usage = client_wants_usage
        self.t0 = t0
        self.choices: dict[int, _ChoiceStream] = {}
        self.outcome = Outcome()
        self.finished = False
        # The envelope of this stream's plain content chunks, learned from the first one:
        # see :meth:`_fast_event`.
        self._envelope: _Envelope | None = None
        self._envelope_tries = 0

    def _choice(self, index: int) -> _ChoiceStream:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _ChoiceStream(self.started_in_think)
        return state

    def event(self, payload: bytes) -> bytes | None:
        """One upstream ``data:`` payload in, the SSE bytes to send out (or None)."""
        envelope = self._envelope
        if envelope is not None and payload.startswith(envelope.head):
            out = self._fast_event(payload, envelope)
            if out is not _SLOW:
                return out
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
        if self._envelope is None and self._envelope_tries < _ENVELOPE_TRIES:
            self._learn_envelope(payload, chunk)
        if "error" in chunk or chunk.get("object") == "error":
            return b"data: " + orjson.dumps(_error_event(chunk)) + b"\n\n"
        changed = False
        kept = []
        for choice in chunk.get("choices") or ():
            keep, touched = self._shape_choice(choice)
            changed |= touched or not keep
            if keep:
                kept.append(choice)
        usage = chunk.get("usage")
        if usage:
            self._usage(usage)
            changed = True
            if not self.client_wants_usage:
                if not kept:
                    return None
                del chunk["usage"]
                changed = True
        elif not kept:
            return None
        if not changed:
            return b"data: " + payload + b"\n\n"
        chunk["choices"] = kept
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def _fast_event(self, payload: bytes, envelope: _Envelope) -> Any:
        """A plain content chunk in the learned envelope, shaped without parsing or
        re-serialising the envelope (``_SLOW`` when the chunk is anything else)."""
        if not payload.endswith(envelope.tail):
            return _SLOW
        end = len(payload) - envelope.tail_len
        if payload[end] != _BRACE or not payload.startswith(_CONTENT_KEY, envelope.head_len):
            return _SLOW
        try:
            content = orjson.loads(payload[envelope.head_len + _CONTENT_LEN : end])
        except orjson.JSONDecodeError:
            return _SLOW
        if type(content) is not str:
            return _SLOW
        state = self.choices.get(envelope.index)
        if state is None or state.upstream_split:
            return _SLOW
        # What _shape_choice does for a delta of only text, no finish_reason.
        reasoning = answer = ""
        if content:
            splitter = state.splitter
            was_closed = splitter.closed
            reasoning, answer = splitter.feed(content)
            if not was_closed:
                state.reasoning_chunks += 1
        outcome = self.outcome
        if reasoning and outcome.first_reasoning is None:
            outcome.first_reasoning = time.perf_counter() - self.t0
        if answer and outcome.first_answer is None:
            outcome.first_answer = time.perf_counter() - self.t0
        mode = self.mode
        if mode == "inline":  # not split upstream: the text as the model wrote it
            return b"data: " + payload + b"\n\n"
        if mode == "hide" or not reasoning:
            if not answer:
                return None
            delta = b'{"content":' + orjson.dumps(answer) + b"}"
        elif not answer and self.field_mode == "reasoning_content":
            delta = b'{"reasoning_content":' + orjson.dumps(reasoning) + b"}"
        else:
            new_delta = {"content": answer} if answer else {}
            _set_reasoning(new_delta, self.field_mode, reasoning)
            delta = orjson.dumps(new_delta)
        return envelope.prefix + delta + envelope.suffix

    def _learn_envelope(self, payload: bytes, chunk: dict[str, Any]) -> None:
        """Remember the bytes around the delta of a plain content chunk, if this one is,
        checked by parsing the envelope around a stand-in delta."""
        self._envelope_tries += 1
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) != 1:
            return
        choice = choices[0]
        if not isinstance(choice, dict) or "error" in chunk or chunk.get("usage") is not None:
            return
        delta = choice.get("delta")
        index = choice.get("index", 0)
        if not isinstance(delta, dict) or list(delta) != ["content"]:
            return
        if type(delta["content"]) is not str:
            return
        if choice.get("finish_reason") is not None or type(index) is not int:
            return
        at = payload.find(_CONTENT_KEY)
        if at < 0 or payload.find(_CONTENT_KEY, at + 1) >= 0:
            return
        end = payload.find(b"}", at + _CONTENT_LEN)
        while end >= 0:  # the delta's closing brace: the first one after a valid literal
            try:
                orjson.loads(payload[at + _CONTENT_LEN : end])
                break
            except orjson.JSONDecodeError:
                end = payload.find(b"}", end + 1)
        if end < 0:
            return
        head, tail = payload[:at], payload[end + 1 :]
        try:
            probe = orjson.loads(head + b'"delta":{"content":"x"}' + tail)
        except orjson.JSONDecodeError:
            return
        expected = {**chunk, "choices": [{**choice, "delta": {"content": "x"}}]}
        if probe == expected and probe.get("object") != "error":
            self._envelope = _Envelope(head, tail, index)

    def _usage(self, usage: dict[str, Any]) -> None:
        outcome = self.outcome
        _read_usage(outcome, usage)
        counted = sum(state.reasoning_chunks for state in self.choices.values())
        _add_reasoning_tokens(usage, min(counted, outcome.completion_tokens))
        outcome.reasoning_tokens = int(usage["completion_tokens_details"]["reasoning_tokens"])

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
            if reasoning:
                state.reasoning_chunks += 1
        else:
            splitter = state.splitter
            reasoning = answer = ""
            if content:
                was_closed = splitter.closed
                reasoning, answer = splitter.feed(content)
                if not was_closed:
                    state.reasoning_chunks += 1
            if finish is not None:
                r, a = splitter.finish()
                reasoning += r
                answer += a
                flags = splitter.result()
                if flags.reasoning is None:
                    state.reasoning_chunks = 0
                self.outcome.anomalies += splitter.anomalies
        now = None
        if reasoning and self.outcome.first_reasoning is None:
            now = time.perf_counter()
            self.outcome.first_reasoning = now - self.t0
        if answer and self.outcome.first_answer is None:
            self.outcome.first_answer = (now or time.perf_counter()) - self.t0
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
            new_delta: dict[str, Any] = {"content": text} if text else {}
        else:
            new_delta = {"content": answer} if answer else {}
            if self.mode == "separate" and reasoning:
                _set_reasoning(new_delta, self.field_mode, reasoning)
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
