"""The flywheel: shadow results as rows ``distill generate`` reads.

The input row is recovered from the student's user message with the task's template, the
texts from whole or streamed replies, and rows go to an append-only JSONL (mode 0600,
rotated at a size limit). :mod:`gateway.shadow` decides what is written.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any

import orjson

from distill_common.task import Task
from distill_common.think import join_reasoning
from gateway.sse import SSEDecoder


def fields_of(task: Task, user_text: str) -> dict[str, str] | None:
    """The input row whose rendered user message is ``user_text``, or ``None``."""
    pattern, names = "", []
    for literal, name, _, _ in string.Formatter().parse(task.user_template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P={name})" if name in names else f"(?P<{name}>.*?)"
            names.append(name)
    match = re.fullmatch(pattern, user_text.strip(), re.DOTALL)
    if match is None:
        return None
    row = {k: v.strip() for k, v in match.groupdict().items()}
    if any(not v for v in row.values()) or task.render_user(row) != user_text.strip():
        return None
    return row


def raw_answer(completion: dict[str, Any]) -> dict[str, Any]:
    """The fields ``distill generate`` stores per teacher answer, from a whole completion."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    return {
        "content": message.get("content") or "",
        "reasoning_content": message.get("reasoning_content"),
        "reasoning": message.get("reasoning"),
        "finish_reason": choice.get("finish_reason"),
        "usage": completion.get("usage"),
        "model": completion.get("model"),
    }


def answer_text(raw: dict[str, Any]) -> str:
    """One text (reasoning + answer) from a message or raw answer, whatever field holds it."""
    reasoning = raw.get("reasoning_content")
    if reasoning is None or not str(reasoning).strip():
        reasoning = raw.get("reasoning")
    return join_reasoning(reasoning, raw.get("content"))


def completion_text(completion: dict[str, Any]) -> str:
    """The student's text (reasoning + answer) from a whole upstream completion (choice 0)."""
    try:
        return answer_text(completion["choices"][0]["message"])
    except (KeyError, IndexError, TypeError):
        return ""


def stream_text(body: bytes) -> str:
    """The student's text from the raw upstream SSE bytes of one streamed reply (choice 0)."""
    parts: dict[str, list[str]] = {"content": [], "reasoning_content": [], "reasoning": []}
    for payload in SSEDecoder().feed(body):
        if payload.strip() == b"[DONE]":
            continue
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("index", 0) == 0:
                for name, bucket in parts.items():
                    if isinstance(piece := delta.get(name), str):
                        bucket.append(piece)
    return answer_text({k: "".join(v) or None for k, v in parts.items()})


_LINE_BREAKS = (
    (b"\xc2\x85", b"\\u0085"),
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
)


class Flywheel:
    """Append-only JSONL, mode 0600, rotated to ``.1 … .N`` at a size limit."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row)
        for sep, escaped in _LINE_BREAKS:  # str.splitlines (generate's reader) breaks on these
            line = line.replace(sep, escaped)
        line += b"\n"
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(line) > self.max_bytes:
            self._rotate()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, line)
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
