"""The generate stage's reasoning normaliser: every shape servers use, and the broken ones."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_common.think import THINK_CLOSE, THINK_OPEN, format_answer, is_canonical
from pipeline.generate.normalise import normalise, response_text

REASONING = "嗯,标题里有“芯片”和“大模型”,这是科技。\n会不会是财经?没有营收数据,排除。"
CANON = format_answer(REASONING, "科技")


def shapes(reasoning: str, answer: str) -> dict[str, dict]:
    """The four ways real servers return reasoning, plus padded and stray-tag variants."""
    return {
        "reasoning_content": {"reasoning_content": reasoning, "content": answer},
        "reasoning": {"reasoning": reasoning, "content": answer},
        "inline": {"content": f"<think>\n{reasoning}\n</think>\n\n{answer}"},
        "inline-no-open": {"content": f"{reasoning}\n</think>\n\n{answer}"},
        "padded": {"content": f"  \n<think>  {reasoning}  </think>   {answer}  \n\n"},
        "stray-open": {"content": f"<think>\n<think>\n{reasoning}</think>\n{answer}"},
        "split-and-tagged": {
            "reasoning_content": reasoning,
            "content": f"<think>{reasoning}</think>\n\n{answer}",
        },
        "field-padded": {"reasoning_content": f"\n\n{reasoning}\n", "content": f"\n\n{answer}\n"},
    }


@pytest.mark.parametrize("shape", list(shapes(REASONING, "科技")))
def test_every_shape_gives_the_canonical_text(news_task, shape):
    raw = {**shapes(REASONING, "科技")[shape], "finish_reason": "stop"}
    out = normalise(raw, news_task)
    assert out.accepted, out
    assert out.text == CANON
    assert out.label == "科技"
    assert out.reasoning == REASONING
    assert is_canonical(out.text)


def test_answer_punctuation_is_read_by_the_task_rule(news_task):
    out = normalise({"reasoning_content": REASONING, "content": "科技。"}, news_task)
    assert out.text == CANON


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (
            {"reasoning_content": REASONING[:10], "content": "", "finish_reason": "length"},
            "truncated",
        ),
        (
            {"content": f"<think>{REASONING}</think>\n\n科技", "finish_reason": "length"},
            "truncated",
        ),
        ({"content": "", "finish_reason": "stop"}, "empty_body"),
        ({"content": "   \n", "reasoning_content": "  "}, "empty_body"),
        ({"content": "科技"}, "no_reasoning"),
        ({"content": "<think>\n\n</think>\n\n科技"}, "no_reasoning"),
        ({"reasoning_content": "   ", "content": "科技"}, "no_reasoning"),
        ({"content": f"<think>\n{REASONING}\n\n科技"}, "unclosed_think"),
        ({"content": f"<think>{REASONING[:9]}<think>{REASONING}</think>\n\n科技"}, "stray_tag"),
        ({"content": f"<think>{REASONING}</think>\n\n科技</think>"}, "stray_tag"),
        ({"content": f"<think>{REASONING}</think>\n\n<think>科技"}, "stray_tag"),
        ({"content": f"<think>{REASONING}</think>\n\n"}, "no_answer"),
        ({"content": f"<think>{REASONING}</think>\n\n天气"}, "label_not_in_set"),
        ({"content": f"<think>{REASONING}</think>\n\n科技 因为有芯片"}, "label_not_in_set"),
        ({"error": "gave up after 8 attempts; last: http_500"}, "request_failed"),
        ({"error": "gave up", "error_reason": "empty_body"}, "empty_body"),
    ],
)
def test_broken_responses_are_rejected_with_their_reason(news_task, raw, reason):
    out = normalise(raw, news_task)
    assert not out.accepted
    assert out.reason == reason
    assert out.text is None


def test_gold_mismatch_only_with_the_gold_filter(news_task):
    raw = {"reasoning_content": REASONING, "content": "科技"}
    assert normalise(raw, news_task, gold="财经").accepted
    out = normalise(raw, news_task, gold="财经", require_gold=True)
    assert (out.reason, out.label) == ("gold_mismatch", "科技")
    assert normalise(raw, news_task, gold="科技", require_gold=True).accepted


def test_response_text_prefers_reasoning_content_then_reasoning():
    assert response_text({"reasoning": "r", "content": "a"}) == format_answer("r", "a")
    assert response_text({"reasoning_content": "", "reasoning": "r", "content": "a"}) == (
        format_answer("r", "a")
    )
    assert response_text({"content": "x"}) == "x"


_tagless = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=200,
).filter(lambda s: s.strip() and THINK_OPEN not in s and THINK_CLOSE not in s)
_ws = st.text(alphabet=" \n\t\r", max_size=3)


@settings(max_examples=200, deadline=None)
@given(
    reasoning=_tagless,
    label_index=st.integers(0, 14),
    shape=st.sampled_from(list(shapes("r", "a"))),
    pad=_ws,
)
def test_any_valid_record_round_trips(news_task, reasoning, label_index, shape, pad):
    """A valid record, in any shape and with any surrounding whitespace, normalises to the
    canonical text, and the canonical text normalises to itself."""
    label = news_task.labels[label_index]
    raw = {
        k: f"{pad}{v}{pad}" if isinstance(v, str) else v
        for k, v in shapes(reasoning, label)[shape].items()
    }
    out = normalise(raw, news_task)
    assert out.accepted, (raw, out)
    assert out.text == format_answer(reasoning.strip(), label)
    assert is_canonical(out.text)
    again = normalise({"content": out.text, "finish_reason": "stop"}, news_task)
    assert again.text == out.text
