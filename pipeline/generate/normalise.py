"""Turn one raw teacher response into the canonical answer text, or a reject reason.

Built only on :mod:`distill_common.think` (the format rules) and :meth:`Task.read_label` (the answer
rule); this module adds the *policy*: which anomalies are tolerated and which reject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill_common.task import Task
from distill_common.think import THINK_CLOSE, THINK_OPEN, format_answer, join_reasoning, split_think

# Reject reasons, in the order the checks run.
TRUNCATED = "truncated"
EMPTY_BODY = "empty_body"
NO_REASONING = "no_reasoning"
UNCLOSED_THINK = "unclosed_think"
STRAY_TAG = "stray_tag"
NO_ANSWER = "no_answer"
LABEL_NOT_IN_SET = "label_not_in_set"
GOLD_MISMATCH = "gold_mismatch"
REQUEST_FAILED = "request_failed"

REASONS = (
    TRUNCATED,
    EMPTY_BODY,
    NO_REASONING,
    UNCLOSED_THINK,
    STRAY_TAG,
    NO_ANSWER,
    LABEL_NOT_IN_SET,
    GOLD_MISMATCH,
    REQUEST_FAILED,
)


@dataclass(frozen=True)
class Outcome:
    """The verdict on one response: ``text``/``label`` when accepted, else ``reason``.

    ``label`` is also set for a ``gold_mismatch`` reject (the teacher's well-formed but wrong
    answer), so callers can report the teacher's accuracy.
    """

    text: str | None = None
    label: str | None = None
    reasoning: str | None = None
    reason: str | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is None


def response_text(raw: dict[str, Any]) -> str:
    """One text from whichever of the four reasoning shapes the server used."""
    reasoning = raw.get("reasoning_content")
    if reasoning is None or not str(reasoning).strip():
        reasoning = raw.get("reasoning")
    return join_reasoning(reasoning, raw.get("content"))


def _reject(reason: str, detail: str = "", label: str | None = None) -> Outcome:
    return Outcome(reason=reason, detail=detail, label=label)


def normalise(
    raw: dict[str, Any], task: Task, *, gold: str | None = None, require_gold: bool = False
) -> Outcome:
    """Judge a stored raw response (``content``, ``reasoning_content``/``reasoning``,
    ``finish_reason``, or ``error`` for a request that never got an answer)."""
    if raw.get("error"):
        return _reject(raw.get("error_reason") or REQUEST_FAILED, str(raw["error"]))
    if raw.get("finish_reason") == "length":
        return _reject(TRUNCATED, "finish_reason=length")
    text = response_text(raw)
    if not text.strip():
        return _reject(EMPTY_BODY)
    parts = split_think(text)
    if parts.reasoning is None:
        return _reject(NO_REASONING, "no </think> in the response")
    if not parts.closed:
        return _reject(UNCLOSED_THINK)
    if not parts.reasoning:
        return _reject(NO_REASONING, "empty think section")
    # Extra opening tags *before* the reasoning are tolerated (split_think drops them); a tag
    # inside the reasoning or in the answer means the text is garbled.
    if THINK_OPEN in parts.reasoning or THINK_OPEN in parts.answer or THINK_CLOSE in parts.answer:
        return _reject(STRAY_TAG)
    if not parts.answer:
        return _reject(NO_ANSWER)
    label = task.read_label(parts.answer)
    if label is None:
        return _reject(LABEL_NOT_IN_SET, parts.answer[:200])
    if require_gold and gold is not None and label != gold:
        return _reject(GOLD_MISMATCH, f"teacher said {label}, gold is {gold}", label=label)
    return Outcome(
        text=format_answer(parts.reasoning, label), label=label, reasoning=parts.reasoning
    )
