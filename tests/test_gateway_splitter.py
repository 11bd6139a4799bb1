"""The gateway's streaming think splitter agrees with ``split_think`` for any chunking."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_common.think import ThinkSplit, ThinkStreamSplitter, split_think

# Responses the way students and teachers really write them, and the ways they go wrong.
CORPUS = [
    "<think>\n先看关键词：央行、降准。\n</think>\n\n财经",
    "先看关键词。\n</think>\n\n财经",  # opening tag in the prompt (chat template)
    "<think>\n<think>\n想想\n</think>\n\n体育",  # stray second opening tag
    "<think>\n想了很久还没有想完",  # cut by max_tokens
    "体育",  # a model that did not think
    "<think></think>体育",  # empty reasoning
    "<think>\n a \n\n</think>\n\n\n  体育 \n",
    "<think>x</think>a</think>b",  # a closing tag in the answer
    "<think>x <think> y</think>z",  # stray tag inside the reasoning
    "<thinking>not a tag</thinking> answer",
    "  \n\n  ",
    "",
    "<think",
    "</think>",
    "<think>\n",
    "a </thi b </think> c",
    "<<think>>x</think>y",
    "<think>x</</think>y",
    "<think>a\u3000\u2003</think>\u3000b\u3000",  # unicode whitespace
]


def split_stream(text: str, cuts: list[int], *, started_in_think: bool) -> ThinkSplit:
    """Feed ``text`` cut at ``cuts`` and rebuild a ThinkSplit from the deltas and flags."""
    splitter = ThinkStreamSplitter(started_in_think=started_in_think)
    reasoning, answer = [], []
    bounds = [0, *sorted(set(cuts)), len(text)]
    for lo, hi in itertools.pairwise(bounds):
        r, a = splitter.feed(text[lo:hi])
        reasoning.append(r)
        answer.append(a)
    r, a = splitter.finish()
    reasoning.append(r)
    answer.append(a)
    flags = splitter.result()
    return ThinkSplit(
        reasoning=None if flags.reasoning is None else "".join(reasoning),
        answer="".join(answer),
        opened=flags.opened,
        closed=flags.closed,
        stray_open=flags.stray_open,
    )


def check(text: str, cuts: list[int], started_in_think: bool) -> None:
    whole = split_think(text, started_in_think=started_in_think)
    streamed = split_stream(text, cuts, started_in_think=started_in_think)
    assert streamed == whole, (text, cuts)


def every_single_cut(text: str):
    yield []
    for i in range(1, len(text)):
        yield [i]
    yield list(range(1, len(text)))  # one character at a time


@pytest.mark.parametrize("started_in_think", [False, True])
@pytest.mark.parametrize("text", CORPUS)
def test_corpus_every_single_cut_and_char_by_char(text, started_in_think):
    for cuts in every_single_cut(text):
        check(text, cuts, started_in_think)


# Text built from the pieces that make splitting hard: tag fragments, whitespace, CJK.
pieces = st.sampled_from(
    [
        "<think>",
        "</think>",
        "<",
        "</",
        "think",
        ">",
        "/",
        "\n",
        "\n\n",
        " ",
        "\u3000",
        "想",
        "a",
        "体育",
    ]
)
texts = st.one_of(st.sampled_from(CORPUS), st.lists(pieces, max_size=30).map("".join))


@settings(max_examples=600, deadline=None)
@given(data=st.data(), text=texts, started_in_think=st.booleans())
def test_any_chunking_matches_split_think(data, text, started_in_think):
    cuts = data.draw(st.lists(st.integers(0, max(len(text), 0)), max_size=12))
    check(text, cuts, started_in_think)


@pytest.mark.parametrize(
    ("chunks", "reasoning", "answer"),
    [
        (["<think>\n想", "想\n</thi", "nk>\n", "\n体育"], "想想", "体育"),  # tag split
        (["<think>想想</think>\n\n体育"], "想想", "体育"),  # both in one delta
        (["想想", "</think>", "\n\n", "体育"], "想想", "体育"),  # prompt opened it
        (["<think>", "\n<think>\n", "想想</think>体育"], "想想", "体育"),  # stray open tag
    ],
)
def test_nasty_streams_release_text_early(chunks, reasoning, answer):
    splitter = ThinkStreamSplitter(started_in_think=True)
    got = [splitter.feed(c) for c in chunks]
    r = "".join(x for x, _ in got)
    a = "".join(y for _, y in got)
    tail = splitter.finish()
    assert (r + tail[0], a + tail[1]) == (reasoning, answer)
    assert a == answer  # the answer was out before the stream ended


def test_unclosed_reasoning_never_leaks_into_the_answer():
    splitter = ThinkStreamSplitter()
    out = [splitter.feed(c) for c in ["<think>\n想", "了很久"]] + [splitter.finish()]
    assert "".join(a for _, a in out) == ""
    assert "".join(r for r, _ in out) == "想了很久"
    assert splitter.anomalies == ["unclosed"]


def test_reasoning_streams_while_it_is_written():
    """Only a tag-sized tail is held back, so reasoning reaches the client token by token."""
    splitter = ThinkStreamSplitter()
    splitter.feed("<think>")
    released = [splitter.feed(f"step {i} ")[0] for i in range(1000)]
    assert all(released[1:])
    assert len(splitter._partial) < len("</think>")
