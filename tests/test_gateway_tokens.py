"""Reasoning/answer token counts and the fields a client sees, the same streamed and whole.

One upstream output is given to :func:`shape_completion` as a whole completion and to
:class:`StreamShaper` as chunked streams (inline ``<think>`` and upstream-split formats, one or
two choices); counts come from the estimating counter and from a real tokenizer trained here.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.metrics import Metrics
from gateway.modes import StreamShaper, shape_completion
from gateway.settings import Settings
from gateway.tokens import ESTIMATE, ExactCounter, TokenizerError, load_counter

SAMPLES = [
    ("The user asks for 2+2. Add: two and two make four.", "The answer is 4."),
    ("想一想：三加五等于八。", "答案是 8。"),
    ("Only thinking, the budget ran out before an answer.", ""),
    ("", "A direct answer with no reasoning at all."),
]
COMPLETION_TOKENS = 37


def _train_tokenizer(directory: Path) -> Path:
    """A small byte-level BPE on the samples, saved as ``directory/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([r + " " + a for r, a in SAMPLES] * 4, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["estimate", "exact"])
def counter(request: pytest.FixtureRequest, tokenizer_dir: Path) -> Any:
    return ESTIMATE if request.param == "estimate" else load_counter(tokenizer_dir)


# ---- one output, whole and streamed --------------------------------------------------------


def _whole(texts: list[tuple[str, str]], fmt: str) -> dict[str, Any]:
    choices = []
    for i, (reasoning, answer) in enumerate(texts):
        if fmt == "inline":
            message = {
                "role": "assistant",
                "content": f"<think>\n{reasoning}\n</think>\n\n{answer}",
            }
        else:
            message = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
        choices.append({"index": i, "message": message, "finish_reason": "stop"})
    usage = {"prompt_tokens": 5, "completion_tokens": COMPLETION_TOKENS}
    return {"id": "c", "object": "chat.completion", "choices": choices, "usage": usage}


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points) if b > a]


def _stream(texts: list[tuple[str, str]], fmt: str, cuts: list[int]) -> list[bytes]:
    """The same output as stream events: a role chunk, text deltas cut at ``cuts`` (choices
    interleaved), a finish per choice, then the usage-only chunk and [DONE]."""
    per_choice: list[list[dict[str, Any]]] = []
    for reasoning, answer in texts:
        if fmt == "inline":
            deltas = [
                {"content": p} for p in _pieces(f"<think>\n{reasoning}\n</think>\n\n{answer}", cuts)
            ]
        else:
            deltas = [{"reasoning_content": p} for p in _pieces(reasoning, cuts)]
            deltas += [{"content": p} for p in _pieces(answer, cuts)]
        per_choice.append(deltas)
    chunks = [
        {"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(len(texts))
    ]
    for step in range(max(len(d) for d in per_choice)):
        for i, deltas in enumerate(per_choice):
            if step < len(deltas):
                chunks.append({"index": i, "delta": deltas[step]})
    chunks += [{"index": i, "delta": {}, "finish_reason": "stop"} for i in range(len(texts))]
    events = [{"id": "c", "object": "chat.completion.chunk", "choices": [c]} for c in chunks]
    usage = {"prompt_tokens": 5, "completion_tokens": COMPLETION_TOKENS, "total_tokens": 42}
    events.append({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
    return [orjson.dumps(e) for e in events] + [b"[DONE]"]


def _run_stream(shaper: StreamShaper, events: list[bytes]) -> tuple[dict[int, dict], Any]:
    """What a client joining the deltas gets per choice, and the last usage it saw."""
    got: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        out = shaper.event(event)
        if out is None:
            continue
        chunk = orjson.loads(out[len(b"data: ") :])
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            message = got.setdefault(choice["index"], {})
            for key, value in choice["delta"].items():
                if key in ("content", "reasoning_content") and message.get(key) is not None:
                    message[key] += value or ""
                elif key not in message or message[key] is None:
                    message[key] = value
    assert shaper.finished
    return got, usage


FORMATS = ["inline", "reasoning_content"]
CHUNKINGS = [[], [1], [3, 7, 11, 19, 23], list(range(0, 200, 2)), list(range(200))]
CHOICE_SETS = [[SAMPLES[0]], [SAMPLES[1]], [SAMPLES[2]], [SAMPLES[3]], [SAMPLES[0], SAMPLES[1]]]


def _check_same(texts: list[tuple[str, str]], fmt: str, cuts: list[int], counter: Any) -> None:
    whole = _whole(texts, fmt)
    outcome = shape_completion(whole, "separate", "reasoning_content", False, counter)
    shaper = StreamShaper(
        "separate", "reasoning_content", False, client_wants_usage=True, t0=0.0, counter=counter
    )
    streamed, usage = _run_stream(shaper, _stream(texts, fmt, cuts))
    whole_details = whole["usage"]["completion_tokens_details"]
    assert usage["completion_tokens_details"] == whole_details
    assert (shaper.outcome.reasoning_tokens, shaper.outcome.answer_tokens) == (
        outcome.reasoning_tokens,
        outcome.answer_tokens,
    )
    assert outcome.reasoning_tokens + outcome.answer_tokens == COMPLETION_TOKENS or (
        counter.exact and outcome.reasoning_tokens == 0
    )
    for choice in whole["choices"]:
        message = choice["message"]
        got = streamed[choice["index"]]
        assert got.get("content") == message["content"]
        assert got.get("reasoning_content") == message["reasoning_content"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cuts", CHUNKINGS, ids=lambda c: f"cuts{len(c)}")
@pytest.mark.parametrize("texts", CHOICE_SETS, ids=lambda t: f"n{len(t)}-{len(t[0][0])}")
def test_streamed_and_whole_report_the_same_counts_and_fields(texts, fmt, cuts, counter):
    _check_same(texts, fmt, cuts, counter)


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(
        st.tuples(st.text(max_size=40), st.text(max_size=40)).map(
            lambda t: (t[0].strip().replace("<", "‹"), t[1].strip().replace("<", "‹"))
        ),
        min_size=1,
        max_size=2,
    ),
    fmt=st.sampled_from(FORMATS),
    cuts=st.lists(st.integers(0, 200), max_size=30),
)
def test_any_chunking_gives_the_whole_responses_counts(texts, fmt, cuts, tokenizer_dir):
    for counter in (ESTIMATE, load_counter(tokenizer_dir)):
        _check_same(texts, fmt, cuts, counter)


# ---- exactness -----------------------------------------------------------------------------


def test_exact_counts_encode_the_answer_and_leave_the_rest_to_reasoning(tokenizer_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    counter = load_counter(tokenizer_dir)
    assert counter.exact and isinstance(counter, ExactCounter)
    texts = [SAMPLES[0], SAMPLES[1]]
    expected = sum(len(tok.encode(a, add_special_tokens=False).ids) for _, a in texts)
    for events in ([_whole(texts, "inline")], _stream(texts, "inline", [2, 5, 9])):
        if len(events) == 1:
            outcome = shape_completion(events[0], "hide", "reasoning_content", False, counter)
        else:
            shaper = StreamShaper(
                "hide", "reasoning_content", False, client_wants_usage=False, t0=0, counter=counter
            )
            for event in events:
                shaper.event(event)
            outcome = shaper.outcome
        assert outcome.answer_tokens == expected > 0
        assert outcome.reasoning_tokens == COMPLETION_TOKENS - expected


def test_the_reasoning_is_never_negative_and_the_estimate_splits_by_characters(tokenizer_dir):
    exact = load_counter(tokenizer_dir)
    answer = "a much longer answer than one token"
    answer_tokens = exact.split(1000, [("r", answer)])[1]
    assert answer_tokens > 1 and exact.split(1, [("r", answer)]) == (0, answer_tokens)
    assert ESTIMATE.split(10, [("abc", "d")]) == (8, 2)  # 10 * 3/4 rounded
    assert ESTIMATE.split(10, [("ab", ""), ("", "cd")]) == (5, 5)  # over both choices
    assert ESTIMATE.split(7, []) == (0, 7)
    assert not ESTIMATE.exact


def test_an_upstream_reasoning_count_wins(counter):
    whole = _whole([SAMPLES[0]], "inline")
    whole["usage"]["completion_tokens_details"] = {"reasoning_tokens": 30}
    outcome = shape_completion(whole, "separate", "reasoning_content", False, counter)
    assert (outcome.reasoning_tokens, outcome.answer_tokens) == (30, COMPLETION_TOKENS - 30)
    events = _stream([SAMPLES[0]], "inline", [4])
    last = orjson.loads(events[-2])
    last["usage"]["completion_tokens_details"] = {"reasoning_tokens": 30}
    events[-2] = orjson.dumps(last)
    shaper = StreamShaper(
        "separate", "reasoning_content", False, client_wants_usage=True, t0=0, counter=counter
    )
    _, usage = _run_stream(shaper, events)
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 30
    assert shaper.outcome.reasoning_tokens == 30


def test_mid_stream_usage_is_not_split_until_the_end():
    """vLLM's continuous_usage_stats puts running totals on every chunk: only the last
    counts the split (once, from the whole texts)."""
    events = [orjson.loads(e) for e in _stream([SAMPLES[0]], "inline", [5, 10])[:-1]]
    for n, event in enumerate(events[:-1]):
        event["usage"] = {"prompt_tokens": 5, "completion_tokens": n}
    shaper = StreamShaper("separate", "reasoning_content", False, client_wants_usage=True, t0=0)
    seen = [shaper.event(orjson.dumps(e)) for e in events]
    mid = [orjson.loads(s[6:])["usage"] for s in seen[1:-3] if s]
    assert all("completion_tokens_details" not in u for u in mid)
    whole = _whole([SAMPLES[0]], "inline")
    assert (
        shaper.outcome.reasoning_tokens
        == shape_completion(whole, "separate", "reasoning_content", False).reasoning_tokens
    )


# ---- fields: no reasoning, empty answer ----------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_reasoning_is_null_whole_and_absent_streamed(fmt):
    texts = [SAMPLES[3]]
    whole = _whole(texts, fmt)
    if fmt == "inline":
        whole["choices"][0]["message"]["content"] = SAMPLES[3][1]  # no think section at all
    shape_completion(whole, "separate", "both", False)
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["reasoning"] is None
    shaper = StreamShaper("separate", "both", False, client_wants_usage=False, t0=0)
    streamed, _ = _run_stream(shaper, _stream(texts, fmt, [3]))
    assert "reasoning_content" not in streamed[0] and "reasoning" not in streamed[0]


@pytest.mark.parametrize("mode", ["separate", "hide"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_empty_answer_is_an_empty_string_whole_and_streamed(mode, fmt):
    texts = [SAMPLES[2]]
    whole = _whole(texts, fmt)
    if fmt != "inline":
        whole["choices"][0]["message"]["content"] = None
    shape_completion(whole, mode, "reasoning_content", False)
    assert whole["choices"][0]["message"]["content"] == ""
    shaper = StreamShaper(mode, "reasoning_content", False, client_wants_usage=False, t0=0)
    streamed, _ = _run_stream(shaper, _stream(texts, fmt, [3, 8]))
    assert streamed[0]["content"] == ""


def test_a_tool_calls_null_content_stays_null():
    call = [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    whole = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": call}}
        ]
    }
    shape_completion(whole, "separate", "reasoning_content", False)
    assert whole["choices"][0]["message"]["content"] is None
    shaper = StreamShaper("separate", "reasoning_content", False, client_wants_usage=False, t0=0)
    delta = {"role": "assistant", "content": None, "tool_calls": call}
    out = shaper.event(orjson.dumps({"choices": [{"index": 0, "delta": delta}]}))
    assert out is not None and orjson.loads(out[6:])["choices"][0]["delta"]["content"] is None


# ---- settings and metrics ------------------------------------------------------------------


def test_settings_load_the_tokenizer_or_say_what_was_expected(tmp_path, tokenizer_dir):
    assert Settings(tokenizer=tokenizer_dir).tokenizer == tokenizer_dir
    assert Settings(tokenizer="").tokenizer is None
    assert Settings().tokenizer is None
    with pytest.raises(
        ValidationError, match=re.escape("expected a directory holding tokenizer.json")
    ):
        Settings(tokenizer=tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValidationError, match=re.escape("is not a Hugging Face tokenizer.json")):
        Settings(tokenizer=bad)
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "missing"))):
        load_counter(tmp_path / "missing")
    assert load_counter(None) is ESTIMATE


@pytest.mark.parametrize("value", ["", "off", " OFF "])
def test_an_empty_or_off_tokenizer_setting_is_the_estimate(monkeypatch, value):
    """Compose passes ``${GATEWAY_TOKENIZER:-/runs/merged}``: an empty .env value becomes the
    default there, so `off` is how a compose user asks for estimated counts."""
    monkeypatch.setenv("GATEWAY_TOKENIZER", value)
    assert Settings().tokenizer is None


def test_the_metric_says_whether_counts_are_exact():
    metrics = Metrics()
    text = metrics.scrape().decode()
    assert "gateway_token_counts_exact 0.0" in text
    assert "otherwise estimated" in text
    metrics.set_token_counts_exact(True)
    assert "gateway_token_counts_exact 1.0" in metrics.scrape().decode()
