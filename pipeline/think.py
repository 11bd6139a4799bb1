"""The answer format, in one place: ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``.

Every part of the stack reads and writes R1-style answers through this module: the generate
normaliser, the eval format check and the gateway's streaming splitter. It imports nothing
heavy (stdlib only) so the gateway image can use it without torch.

Shapes we accept on input:

* ``<think>R</think>A``                - inline, as DeepSeek-R1 writes it
* ``R</think>A``                       - inline without the opening tag (R1-distill chat
  templates put ``<think>\\n`` in the prompt, so the model never emits it)
* ``<think><think>R</think>A``         - a stray second opening tag
* leading/trailing whitespace anywhere around the parts
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def format_answer(reasoning: str, answer: str) -> str:
    """Render the canonical answer text."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"


@dataclass(frozen=True)
class ThinkSplit:
    """A response split into its reasoning and its answer.

    ``reasoning`` is ``None`` when the text had no think section at all. ``closed`` tells
    whether ``</think>`` was seen; an unclosed think section leaves ``answer`` empty.
    ``stray_open`` counts opening tags beyond the first (a stray ``<think>``).
    """

    reasoning: str | None
    answer: str
    opened: bool
    closed: bool
    stray_open: int = 0

    @property
    def anomalies(self) -> list[str]:
        """Names of the format problems in this response (empty when well formed)."""
        out = []
        if self.reasoning is not None and not self.closed:
            out.append("unclosed")
        if self.stray_open or (self.closed and THINK_CLOSE in self.answer):
            out.append("stray_tag")
        return out


def _strip_open_tags(text: str) -> tuple[str, int]:
    """Remove leading ``<think>`` tags (and whitespace around them); return text and count."""
    count = 0
    text = text.lstrip()
    while text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN) :].lstrip()
        count += 1
    return text, count


def split_think(text: str, *, started_in_think: bool = False) -> ThinkSplit:
    """Split a whole response into reasoning and answer.

    ``started_in_think`` says the prompt already opened the think section, so text before
    any tag is reasoning even if no ``</think>`` follows (a response cut by ``max_tokens``).
    """
    body, opens = _strip_open_tags(text)
    opened = opens > 0 or started_in_think
    head, sep, tail = body.partition(THINK_CLOSE)
    if sep:
        return ThinkSplit(
            reasoning=head.strip(),
            answer=tail.strip(),
            opened=opened,
            closed=True,
            stray_open=max(opens - 1, 0) + head.count(THINK_OPEN),
        )
    if opened:
        return ThinkSplit(
            reasoning=body.strip(),
            answer="",
            opened=True,
            closed=False,
            stray_open=max(opens - 1, 0) + body.count(THINK_OPEN),
        )
    return ThinkSplit(reasoning=None, answer=body.strip(), opened=False, closed=False)


def join_reasoning(reasoning: str | None, content: str | None) -> str:
    """Rebuild one text from a response whose server already split the reasoning out.

    DeepSeek/Bailian send ``reasoning_content``, vLLM sends ``reasoning``; some servers also
    leave ``<think>`` tags in ``content``. The result is something :func:`split_think` reads.
    """
    content = content or ""
    if reasoning is None or not reasoning.strip():
        return content
    if THINK_CLOSE in content:  # the server split and still left tags: trust the content
        return content
    return format_answer(reasoning.strip(), content.strip())


def is_canonical(text: str) -> bool:
    """True when ``text`` is exactly in the canonical shape with non-empty parts."""
    parts = split_think(text)
    if not (parts.closed and parts.reasoning and parts.answer) or parts.anomalies:
        return False
    return text == format_answer(parts.reasoning, parts.answer)
