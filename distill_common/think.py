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
    if not content.strip():  # reasoning but no answer: the think section never ended
        return f"{THINK_OPEN}\n{reasoning.strip()}"
    return format_answer(reasoning.strip(), content.strip())


def is_canonical(text: str) -> bool:
    """True when ``text`` is exactly in the canonical shape with non-empty parts."""
    parts = split_think(text)
    if not (parts.closed and parts.reasoning and parts.answer) or parts.anomalies:
        return False
    return text == format_answer(parts.reasoning, parts.answer)


def _open_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``.

    Tags have one ``<``, at their start, so only the last ``<`` of ``text`` can begin one.
    """
    at = text.rfind("<", max(len(text) - len(tag) + 1, 0))
    if at < 0 or not tag.startswith(text[at:]):
        return 0
    return len(text) - at


class _TagCounter:
    """Counts occurrences of ``tag`` in a text fed in pieces (keeps only a tag-sized tail)."""

    __slots__ = ("count", "tag", "tail")

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.tail = ""
        self.count = 0

    def feed(self, piece: str) -> None:
        tag = self.tag
        if not self.tail and tag[0] not in piece:
            return  # no tag can end here, and none can start
        window = self.tail + piece
        self.count += window.count(tag)
        # Tags hold their first character once, so only its last occurrence in the last
        # len(tag) - 1 characters can start a tag that the next piece ends.
        at = window.rfind(tag[0], max(len(window) - len(tag) + 1, 0))
        self.tail = window[at:] if at >= 0 else ""


class _Section:
    """One stripped section (reasoning or answer) emitted as the text arrives.

    Emits ``text.strip()`` piece by piece: drops leading whitespace and holds back a trailing
    whitespace run until more non-whitespace text shows it is not the end.
    """

    __slots__ = ("held_ws", "started")

    def __init__(self) -> None:
        self.started = False
        self.held_ws: list[str] = []

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        body = piece.rstrip()
        if not body:
            self.held_ws.append(piece)
            return ""
        out = "".join(self.held_ws) + body if self.held_ws else body
        trailing = piece[len(body) :]
        self.held_ws = [trailing] if trailing else []
        return out


class ThinkStreamSplitter:
    """Split a streamed response into reasoning and answer deltas as the chunks arrive.

    For any way of cutting a text into chunks, the reasoning deltas joined and the answer
    deltas joined equal ``split_think(text, started_in_think=...)``'s ``reasoning`` and
    ``answer``, and :meth:`result` equals the whole :class:`ThinkSplit`. Work per chunk is
    proportional to the chunk: only a tag-prefix-sized tail (plus trailing whitespace) is held
    back. One exception is forced by the format: a response that neither starts with
    ``<think>`` nor started in think (``started_in_think=False``) is reasoning only if a
    ``</think>`` follows, so its text is held until that tag or the end of the stream.
    """

    _START, _REASONING, _UNDECIDED, _ANSWER = range(4)

    def __init__(self, *, started_in_think: bool = False) -> None:
        self.started_in_think = started_in_think
        self.opens = 0
        self.closed = False
        self._state = self._START
        self._head = ""  # START: a partial "<think>" held back
        self._partial = ""  # REASONING/UNDECIDED: a partial "</think>" held back
        self._reasoning = _Section()
        self._answer = _Section()
        self._stray = _TagCounter(THINK_OPEN)
        self._close_in_answer = _TagCounter(THINK_CLOSE)
        self._undecided_raw: list[str] = []
        self._undecided_out: list[str] = []

    @property
    def opened(self) -> bool:
        """True when the response opened a think section (or started in one)."""
        return self.opens > 0 or self.started_in_think

    def feed(self, chunk: str) -> tuple[str, str]:
        """Take the next piece of text; return the (reasoning, answer) text it releases."""
        if self._state == self._REASONING and not self._partial and "<" not in chunk:
            # _feed_think's result when no tag can start here (the common case, per token).
            self._stray.feed(chunk)
            return self._reasoning.feed(chunk), ""
        if self._state == self._START:
            return self._feed_start(chunk)
        if self._state == self._ANSWER:
            return "", self._feed_answer(chunk)
        return self._feed_think(chunk)

    def finish(self) -> tuple[str, str]:
        """The stream ended: release what was held back."""
        reasoning = answer = ""
        if self._state == self._START:
            text, self._head = self._head, ""
            self._leave_start()
            if text:
                reasoning, answer = self._feed_think(text)
        if self._state == self._ANSWER:
            return reasoning, answer
        partial, self._partial = self._partial, ""
        if self._state == self._REASONING:
            self._stray.feed(partial)
            return reasoning + self._reasoning.feed(partial), answer
        # UNDECIDED and never closed: everything was the answer after all.
        self._undecided_raw.append(partial)
        self._state = self._ANSWER
        return "", self._answer.feed("".join(self._undecided_raw))

    def result(self) -> ThinkSplit:
        """The flags of the whole response so far, as :func:`split_think` reports them
        (``reasoning``/``answer`` are left empty: the caller has the deltas)."""
        has_reasoning = self.opened or self.closed
        return ThinkSplit(
            reasoning="" if has_reasoning else None,
            answer="",
            opened=self.opened,
            closed=self.closed,
            stray_open=max(self.opens - 1, 0) + self._stray.count if has_reasoning else 0,
        )

    @property
    def anomalies(self) -> list[str]:
        """Format problems seen so far (``unclosed`` only makes sense after :meth:`finish`)."""
        out = []
        if (self.opened or self.closed) and not self.closed:
            out.append("unclosed")
        if self.result().stray_open or (self.closed and self._close_in_answer.count):
            out.append("stray_tag")
        return out

    def _leave_start(self) -> None:
        self._state = self._REASONING if self.opened else self._UNDECIDED

    def _feed_start(self, chunk: str) -> tuple[str, str]:
        text = self._head + chunk
        while True:
            text = text.lstrip()
            if text.startswith(THINK_OPEN):
                self.opens += 1
                text = text[len(THINK_OPEN) :]
                continue
            if THINK_OPEN.startswith(text):  # empty or a partial opening tag
                self._head = text
                return "", ""
            self._head = ""
            self._leave_start()
            return self._feed_think(text)

    def _feed_think(self, chunk: str) -> tuple[str, str]:
        text = self._partial + chunk
        cut = text.find(THINK_CLOSE)
        if cut < 0:
            keep = _open_prefix_len(text, THINK_CLOSE)
            self._partial = text[len(text) - keep :] if keep else ""
            confirmed = text[: len(text) - keep] if keep else text
            answer = ""
        else:
            self._partial = ""
            confirmed = text[:cut]
            rest = text[cut + len(THINK_CLOSE) :]
        if self._state == self._UNDECIDED:
            self._undecided_raw.append(confirmed)
            self._stray.feed(confirmed)
            self._undecided_out.append(self._reasoning.feed(confirmed))
            if cut < 0:
                return "", ""
            reasoning = "".join(self._undecided_out)
            self._undecided_raw.clear()
            self._undecided_out.clear()
        else:
            self._stray.feed(confirmed)
            reasoning = self._reasoning.feed(confirmed)
            if cut < 0:
                return reasoning, ""
        self.closed = True
        self._state = self._ANSWER
        answer = self._feed_answer(rest)
        return reasoning, answer

    def _feed_answer(self, chunk: str) -> str:
        self._close_in_answer.feed(chunk)
        return self._answer.feed(chunk)
