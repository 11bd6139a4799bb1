"""The gateway's SSE decoder: any serialisation of any events, cut anywhere, decodes the same."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import SSEDecoder


def decode(stream: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    """Feed ``stream`` cut at ``cuts``; return the payloads and what is left pending."""
    decoder = SSEDecoder()
    out: list[bytes] = []
    for lo, hi in itertools.pairwise([0, *sorted(set(cuts)), len(stream)]):
        out += decoder.feed(stream[lo:hi])
    return out, decoder.pending


def every_way(stream: bytes):
    """Whole, cut once at each point (inside every \\r\\n too), and one byte at a time."""
    yield []
    for i in range(1, len(stream)):
        yield [i]
    yield list(range(1, len(stream)))


# --------------------------------------------------------------------------- property

# Line text: anything but \r and \n (other Unicode line breaks are plain text to SSE).
text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=12)
other_names = st.one_of(
    st.sampled_from(["event", "id", "retry", "dat", "datas", "Data"]),
    text.filter(lambda s: s and not s.startswith(":") and s.split(":")[0] != "data"),
)
# A line of an event: ("data", value), ("comment", text) or ("other", name, value).
lines = st.one_of(
    st.tuples(st.just("data"), text),
    st.tuples(st.just("comment"), text),
    st.tuples(st.just("other"), other_names, text),
)
events = st.lists(st.lists(lines, max_size=5), max_size=6)
endings = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], bytes]:
    """(stream, the payloads it holds, an unfinished event appended to it)."""
    out: list[str] = []
    last_ending = ""

    def emit(line: str) -> None:
        nonlocal last_ending
        ending = draw(endings)
        if not line and last_ending == "\r" and ending == "\n":
            ending = "\r\n"  # \r then a blank \n would read as one \r\n line break
        out.append(line + ending)
        last_ending = ending

    def serialise(event: list[tuple]) -> None:
        for kind, *rest in event:
            if kind == "data":
                (value,) = rest
                form = draw(st.sampled_from(["data: ", "data:", "data"]))
                if form == "data" and value:
                    form = "data: "
                if form == "data:" and value.startswith(" "):
                    form = "data: "  # else the decoder rightly drops that space
                emit(form + value)
            elif kind == "comment":
                emit(":" + rest[0])
            else:
                name, value = rest
                emit(name if draw(st.booleans()) else f"{name}:{value}")

    for _ in range(draw(st.integers(0, 2))):
        emit("")  # blank lines before the first event dispatch nothing
    expected = []
    for event in draw(events):
        serialise(event)
        emit("")
        data = [rest[0] for kind, *rest in event if kind == "data"]
        if data:
            expected.append("\n".join(data).encode())
    stream = "".join(out).encode()
    unfinished = draw(st.lists(lines, max_size=3))
    out = []
    serialise(unfinished)
    return stream, expected, "".join(out).encode()


@settings(max_examples=500, deadline=None)
@given(data=st.data(), drawn=streams())
def test_any_stream_cut_anywhere_decodes_to_its_events(data, drawn):
    stream, expected, tail = drawn
    cuts = data.draw(st.lists(st.integers(0, len(stream) + len(tail)), max_size=12))
    for how in (cuts, [], list(range(1, len(stream) + len(tail)))):
        assert decode(stream + tail, how) == (expected, tail), how


# --------------------------------------------------------------------------- each rule


@pytest.mark.parametrize(
    ("stream", "payloads"),
    [
        (b"data: a\n\ndata: b\n\n", [b"a", b"b"]),  # vLLM
        (b"data: a\r\n\r\ndata: b\r\n\r\n", [b"a", b"b"]),
        (b"data: a\r\rdata: b\r\r", [b"a", b"b"]),
        (b"data: a\r\n\rdata: b\n\r\n", [b"a", b"b"]),  # mixed
        (b"data:a\n\ndata:  b\n\n", [b"a", b" b"]),  # one leading space removed, no more
        (b"data: a\ndata:\ndata: b\n\n", [b"a\n\nb"]),  # lines joined with \n
        (b"data\n\n", [b""]),  # no colon: an empty data line
        (b"data\ndata\n\n", [b"\n"]),
        (b"data: \n\n", [b""]),
        (b": keep-alive\n\n", []),  # a comment-only event yields nothing
        (b"event: x\nid: 1\nretry: 5\n\n", []),
        (b"event: x\n: hi\ndata: a\nid: 1\n\n", [b"a"]),
        (b"datax: a\ndata x\nData: a\n\n", []),  # not the data field
        (b"\n\n\ndata: a\n\n\n\n", [b"a"]),  # blank lines between events
        (b"data: a:b: c\n\n", [b"a:b: c"]),
        (b"data: \xe6\x96\xb0\xc2\x85\xe2\x80\xa8\n\n", [b"\xe6\x96\xb0\xc2\x85\xe2\x80\xa8"]),
    ],
)
def test_rules_however_the_stream_is_cut(stream, payloads):
    for cuts in every_way(stream):
        assert decode(stream, cuts) == (payloads, b""), cuts


def test_cr_at_a_chunk_end_then_lf_is_one_line_break():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # the \r\n ended the data line, no event yet
    assert decoder.feed(b"\r") == [b"a"]
    assert decoder.feed(b"\n") == []  # the rest of that \r\n: not another blank line
    assert decoder.feed(b"data: b\n\n") == [b"b"]


def test_an_event_ended_by_cr_is_out_before_the_next_chunk():
    """A trailing \\r ends its line at once; only a \\n that follows is folded into it."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [b"a"]
    assert decoder.pending == b""


def test_an_unfinished_event_is_pending_and_never_yielded():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n\ndata: b\n") == [b"a"]
    assert decoder.pending == b"data: b\n"
    assert decoder.feed(b"data: c") == []
    assert decoder.pending == b"data: b\ndata: c"
    assert decoder.feed(b"\n\n") == [b"b\nc"]
    assert decoder.pending == b""
    assert decoder.feed(b": keep-alive\n") == []
    assert decoder.pending == b": keep-alive\n"  # mid-event, even without data
    assert decoder.feed(b"") == [] and decoder.pending == b": keep-alive\n"


def test_events_and_the_rest_in_one_buffer():
    """What ``gateway.planned.sse_data`` promised, before the decoder replaced it."""
    decoder = SSEDecoder()
    payloads = decoder.feed(b'data: {"a":1}\n\n: keep-alive\n\ndata: [DONE]\r\n\r\ndata: {"b"')
    assert payloads == [b'{"a":1}', b"[DONE]"] and decoder.pending == b'data: {"b"'
    assert orjson.loads(payloads[0]) == {"a": 1}
