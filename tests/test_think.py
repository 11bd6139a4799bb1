"""The answer-format rules every stage shares."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill_common.think import format_answer, is_canonical, join_reasoning, split_think


@pytest.mark.parametrize(
    ("text", "reasoning", "answer", "closed"),
    [
        ("<think>\n想想\n</think>\n\n体育", "想想", "体育", True),
        ("想想</think>体育", "想想", "体育", True),  # opening tag in the prompt
        ("  <think><think>想想</think>\n\n体育  ", "想想", "体育", True),  # stray second tag
        ("<think>\n想想还没完", "想想还没完", "", False),  # cut by max_tokens
        ("体育", None, "体育", False),  # no reasoning at all
    ],
)
def test_split_shapes(text, reasoning, answer, closed):
    parts = split_think(text)
    assert (parts.reasoning, parts.answer, parts.closed) == (reasoning, answer, closed)


def test_started_in_think_treats_untagged_text_as_reasoning():
    parts = split_think("还在想", started_in_think=True)
    assert parts.reasoning == "还在想" and parts.answer == "" and "unclosed" in parts.anomalies


def test_stray_tag_is_an_anomaly():
    assert "stray_tag" in split_think("<think><think>a</think>b").anomalies
    assert split_think(format_answer("a", "b")).anomalies == []


def test_join_reasoning_rebuilds_split_responses():
    assert join_reasoning("想想", "体育") == format_answer("想想", "体育")
    assert join_reasoning(None, "<think>x</think>y") == "<think>x</think>y"
    assert join_reasoning("", "体育") == "体育"
    cut = split_think(join_reasoning("想到一半", ""))  # cut by max_tokens inside the reasoning
    assert (cut.reasoning, cut.answer, cut.closed) == ("想到一半", "", False)


text_part = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), min_size=1
    )
    .map(str.strip)
    .filter(bool)
)


@given(reasoning=text_part, answer=text_part)
def test_any_valid_record_round_trips(reasoning, answer):
    text = format_answer(reasoning, answer)
    parts = split_think(text)
    assert (parts.reasoning, parts.answer) == (reasoning, answer)
    assert is_canonical(text)
    assert is_canonical(join_reasoning(reasoning, answer))


def test_non_canonical_shapes_are_detected():
    assert not is_canonical("<think>a</think>b")  # missing newlines
    assert not is_canonical("<think>\n\n</think>\n\nb")  # empty reasoning
    assert not is_canonical("<think>\na\n</think>\n\n")  # empty answer
