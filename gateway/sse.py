"""An incremental server-sent-events decoder (the WHATWG parsing rules the gateway needs).

Lines end in ``\\r\\n``, ``\\n`` or ``\\r``, split anywhere across chunks; an empty line
dispatches the event if it has ``data``; ``data:`` lines are joined with ``\\n``; comments and
other fields are dropped. An unfinished event is never yielded: :attr:`SSEDecoder.pending`
shows it, and the caller decides what a stream that ends there means.
"""

from __future__ import annotations

import re

_EOL = re.compile(rb"\r\n?|\n")


class SSEDecoder:
    """Feed it the stream's chunks; each :meth:`feed` returns the events it completed."""

    __slots__ = ("_cr", "_data", "_head", "_line")

    def __init__(self) -> None:
        self._line = b""  # the unfinished line
        self._head = b""  # the raw lines of the event in progress already parsed
        self._data: list[bytes] = []  # its data lines
        self._cr = False  # the last chunk ended in \r: a \n starting the next one belongs to it

    @property
    def pending(self) -> bytes:
        """The bytes of the event in progress (empty at an event boundary)."""
        return self._head + self._line

    def feed(self, chunk: bytes) -> list[bytes]:
        """The ``data`` payloads of the events ``chunk`` completes, in order."""
        if not chunk:
            return []
        buf = self._line + chunk if self._line else chunk
        out: list[bytes] = []
        pos = 0
        if self._cr:
            self._cr = False
            if buf[:1] == b"\n":  # the second half of a \r\n
                pos = 1
        elif not self._head and b"\r" not in buf:
            # vLLM's case: at an event boundary with \n only, an event ends at the next
            # \n\n, and a lone "data: " line is sliced out without splitting lines.
            while (end := buf.find(b"\n\n", pos)) >= 0:
                if buf.startswith(b"data: ", pos) and buf.find(b"\n", pos, end) < 0:
                    out.append(buf[pos + 6 : end])
                else:
                    for line in buf[pos:end].split(b"\n"):
                        self._field(line)  # no empty lines here but leading no-op ones
                    if self._data:
                        out.append(b"\n".join(self._data))
                        self._data = []
                pos = end + 2
            if buf.find(b"\n", pos) < 0:  # no line of the next event is complete yet
                self._line = buf[pos:]
                return out
        start = 0 if self._head else pos  # where the event in progress begins in buf
        for eol in _EOL.finditer(buf, pos):
            line = buf[pos : eol.start()]
            pos = eol.end()
            if line:
                self._field(line)
                continue
            if self._data:
                out.append(b"\n".join(self._data))
                self._data = []
            self._head = b""
            start = pos
        self._cr = buf.endswith(b"\r")  # then its \r ended the last line, alone so far
        if pos > start:
            self._head += buf[start:pos]
        self._line = buf[pos:]
        return out

    def _field(self, line: bytes) -> None:
        """One non-empty line: keep a ``data`` value, drop comments and other fields."""
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value[:1] == b" " else value)
        elif line == b"data":
            self._data.append(b"")
