"""Generate-stage pieces without a server: inputs, split, ledger keys, the endpoint pool."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.generate.inputs import InputError, read_inputs, split_rows
from pipeline.generate.ledger import Ledger, request_key
from pipeline.generate.teachers import (
    EndpointPool,
    RateLimiter,
    TeacherConfigError,
    TeacherSpec,
    load_teachers,
)
from tests.conftest import ROOT, sample_input

pytestmark = pytest.mark.timeout(30)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


ROWS = [
    {"id": "a", "title": "央行宣布降准0.5个百分点", "label": "财经"},
    {"id": "b", "title": "国足客场2比1逆转取胜", "label": "体育"},
    {"id": "c", "title": "新款电动SUV正式上市", "label": "汽车"},
]


# -- inputs -----------------------------------------------------------------------------
def test_malformed_json_names_file_and_line(tmp_path, news_task):
    path = tmp_path / "in.jsonl"
    path.write_text(
        json.dumps(ROWS[0], ensure_ascii=False) + "\n\n" + '{"id": "x", "title": "半截\n', "utf-8"
    )
    with pytest.raises(InputError, match=rf"^{path}:3: expected one JSON object per line"):
        read_inputs(path, news_task)


def test_non_object_line_is_an_error(tmp_path, news_task):
    path = tmp_path / "in.jsonl"
    path.write_text('["a", "b"]\n', "utf-8")
    with pytest.raises(InputError, match=r":1: expected a JSON object, got list"):
        read_inputs(path, news_task)


def test_missing_field_names_line_and_field(tmp_path, news_task):
    path = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], {"id": "z", "headline": "x"}])
    with pytest.raises(InputError, match=rf"^{path}:2: missing field 'title'"):
        read_inputs(path, news_task)


def test_unknown_gold_label_names_line_and_expected_set(tmp_path, news_task):
    path = write_jsonl(tmp_path / "in.jsonl", [ROWS[0], ROWS[1], {**ROWS[2], "label": "天气"}])
    with pytest.raises(InputError, match=rf"^{path}:3: unknown gold label '天气'.*expected one of"):
        read_inputs(path, news_task)


def test_gold_required_by_gold_match(tmp_path, news_task):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "title": "标题"}])
    assert read_inputs(path, news_task).rows[0].gold is None
    with pytest.raises(InputError, match=r":1: missing gold label field 'label'"):
        read_inputs(path, news_task, require_gold=True)


def test_duplicates_dropped_and_conflicting_ids_refused(tmp_path, news_task):
    dup = {**ROWS[0], "id": "a2", "title": "  央行宣布降准0.5个百分点 "}
    path = write_jsonl(tmp_path / "in.jsonl", [*ROWS, dup])
    inputs = read_inputs(path, news_task)
    assert [r.id for r in inputs.rows] == ["a", "b", "c"]
    assert inputs.duplicates == 1
    path = write_jsonl(tmp_path / "in2.jsonl", [*ROWS, {**ROWS[1], "title": "别的标题"}])
    with pytest.raises(InputError, match=r":4: duplicate id 'b'.*first seen on line 2"):
        read_inputs(path, news_task)


def test_csv_with_configured_field_names(tmp_path, news_task):
    task = news_task.model_copy(
        update={
            "user_template": "新闻分类:{headline}",
            "input": news_task.input.model_copy(
                update={"id_field": "key", "label_field": "category", "fields": ["headline"]}
            ),
        }
    )
    path = tmp_path / "in.csv"
    path.write_text('key,headline,category\nk1,央行宣布降准,财经\nk2,"国足, 逆转",体育\n', "utf-8")
    rows = read_inputs(path, task).rows
    assert [(r.id, r.gold) for r in rows] == [("k1", "财经"), ("k2", "体育")]
    assert rows[1].messages[-1]["content"] == "新闻分类:国足, 逆转"
    path.write_text("key,headline,category\nk1,央行,财经\nk2,国足,天气\n", "utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: unknown gold label '天气'"):
        read_inputs(path, task)


def test_split_is_stratified_seeded_and_order_independent(news_task, tmp_path):
    rows = read_inputs(sample_input(tmp_path), news_task).rows
    a = split_rows(rows, test_ratio=0.15, seed=42)
    b = split_rows(list(reversed(rows)), test_ratio=0.15, seed=42)
    c = split_rows(rows, test_ratio=0.15, seed=7)
    test_a = {r.id for r in a if r.split == "test"}
    assert test_a == {r.id for r in b if r.split == "test"}
    assert test_a != {r.id for r in c if r.split == "test"}
    per_label = Counter(r.gold for r in rows)
    held = Counter(r.gold for r in a if r.split == "test")
    for label, n in per_label.items():
        assert held[label] == int(n * 0.15 + 0.5), label
    assert [r.id for r in a] == [r.id for r in rows]  # input order kept


def test_a_split_named_in_the_input_is_kept_whatever_the_seed(news_task, tmp_path):
    rows = [
        {"id": "a", "title": "央行宣布降准", "label": "财经", "split": "test"},
        {"id": "b", "title": "国足逆转取胜", "label": "体育", "split": "train"},
    ]
    path = write_jsonl(tmp_path / "fixed.jsonl", rows)
    for seed, ratio in [(42, 0.15), (7, 0.5), (0, 0.0)]:
        split = split_rows(read_inputs(path, news_task).rows, test_ratio=ratio, seed=seed)
        assert [(r.id, r.split) for r in split] == [("a", "test"), ("b", "train")]
    more = rows + [
        {"id": f"x{i}", "title": f"新增训练标题{i}", "label": "财经", "split": "train"}
        for i in range(20)
    ]
    split = split_rows(read_inputs(write_jsonl(path, more), news_task).rows, test_ratio=0.5, seed=1)
    assert {r.id for r in split if r.split == "test"} == {"a"}  # adding rows moves nothing


def test_a_bad_or_partial_split_field_names_the_line(news_task, tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"id": "a", "title": "央行宣布降准", "split": "train"},
            {"id": "b", "title": "x", "split": "dev"},
        ],
    )
    with pytest.raises(
        InputError, match=rf"^{path}:2: field 'split' is 'dev'; expected 'train' or"
    ):
        read_inputs(path, news_task)
    path = write_jsonl(
        tmp_path / "partial.jsonl",
        [{"id": "a", "title": "央行宣布降准", "split": "test"}, {"id": "b", "title": "国足逆转"}],
    )
    with pytest.raises(
        InputError, match=rf"^{path}:2: no 'split' field, but 1 other rows have one"
    ):
        read_inputs(path, news_task)


# -- ledger -----------------------------------------------------------------------------
def test_request_key_covers_messages_model_params_and_sample():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "新闻分类:x"}]
    params = {"temperature": 0.6, "max_tokens": 100}
    key = request_key(msgs, "m", params, 0)
    padded = [{"role": m["role"], "content": f" {m['content']}\n"} for m in msgs]
    assert request_key(padded, "m", params, 0) == key
    assert (
        len(
            {
                key,
                request_key(msgs, "m", params, 1),
                request_key(msgs, "m2", params, 0),
                request_key(msgs, "m", {**params, "temperature": 0.7}, 0),
                request_key([msgs[0], {"role": "user", "content": "新闻分类:y"}], "m", params, 0),
            }
        )
        == 5
    )


def test_ledger_round_trip_and_reopen(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    raw = {
        "content": "答",
        "reasoning_content": "想",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    ledger.put("k", row_id="r", sample=0, status="ok", response=raw, endpoint="e", attempts=2)
    ledger.close()
    stored = Ledger(tmp_path / "l.sqlite").load()
    assert stored["k"].response == raw and stored["k"].ok and stored["k"].attempts == 2


# -- teachers ---------------------------------------------------------------------------
def test_teachers_yaml_errors_name_file_and_field(tmp_path, monkeypatch):
    path = tmp_path / "t.yaml"
    path.write_text("teachers:\n  - base_url: http://x/v1\n    max_concurrency: 0\n")
    with pytest.raises(TeacherConfigError, match=rf"^{path}: field 'teachers.0.model'"):
        load_teachers(path)
    example = load_teachers(ROOT / "configs" / "teachers.example.yaml")
    assert len(example.teachers) >= 2
    monkeypatch.delenv(example.teachers[0].api_key_env, raising=False)
    with pytest.raises(TeacherConfigError, match=example.teachers[0].api_key_env):
        example.teachers[0].api_key()


async def test_pool_halves_once_per_window_and_recovers_slowly():
    pool = EndpointPool([TeacherSpec(name="a", base_url="u", model="m", max_concurrency=16)])
    ep = pool.endpoints[0]
    slots = [await pool.acquire() for _ in range(16)]
    assert pool.in_flight == 16
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.acquire(), 0.05)
    for s in slots[:8]:  # a burst of 429s from one window halves the limit once
        await pool.release(s, throttled=True)
    assert ep.limit == 8
    await pool.release(slots[8])
    s = await pool.acquire()  # started after the cut: its 429 halves again
    await pool.release(s, throttled=True)
    assert 4 <= ep.limit < 4.1
    for s in slots[9:]:
        await pool.release(s)
    assert 5 < ep.limit < 6  # 7 successes add about 7/limit, not 7
    for _ in range(200):
        await pool.release(await pool.acquire())
    assert ep.limit == 16


async def test_pool_spreads_over_endpoints_and_respects_global_cap():
    specs = [TeacherSpec(name=n, base_url="u", model="m", max_concurrency=4) for n in "ab"]
    pool = EndpointPool(specs, global_limit=6)
    slots = [await pool.acquire() for _ in range(6)]
    assert Counter(s.endpoint.name for s in slots) == {"a": 3, "b": 3}
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.acquire(), 0.05)


def test_rate_limiter_waits_for_refill():
    rl = RateLimiter(60)  # one per second
    assert rl.wait() == 0
    rl.charge(60)
    assert 0.9 < rl.wait() <= 1.0


# -- retry policy -----------------------------------------------------------------------
def test_retry_after_header_forms():
    import email.utils

    import httpx

    from pipeline.generate.client import _retry_after

    assert _retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert _retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    soon = email.utils.formatdate(__import__("time").time() + 30, usegmt=True)
    assert 28 <= _retry_after(httpx.Headers({"retry-after": soon})) <= 30
    assert _retry_after(httpx.Headers({"retry-after": "soon-ish"})) is None
    assert _retry_after(httpx.Headers({})) is None


def test_backoff_is_jittered_exponential_capped_and_never_before_retry_after():
    from pipeline.generate.client import RetryPolicy

    policy = RetryPolicy(base_s=1.0, cap_s=8.0)
    delays = [policy.delay(3, None) for _ in range(300)]
    assert 0 <= min(delays) < 2 and 6 < max(delays) <= 8  # full jitter over [0, 8]
    assert max(policy.delay(10, None) for _ in range(100)) <= 8
    assert min(policy.delay(0, 5.0) for _ in range(100)) >= 5.0


def test_workers_share_every_limit_and_keep_the_ledger_model():
    """Each worker gets 1/N of each endpoint (rpm/tpm in proportion) and of the global cap;
    the shares add up to what was asked and the ledger keys' model name stays the same."""
    from pipeline.generate.teachers import TeachersConfig
    from pipeline.generate.workers import split_teachers

    cfg = TeachersConfig(
        teachers=[
            TeacherSpec(name="a", base_url="http://a/v1", model="r1", max_concurrency=7, rpm=70),
            TeacherSpec(name="b", base_url="http://b/v1", model="r1-b", max_concurrency=1, tpm=9),
            TeacherSpec(name="c", base_url="http://c/v1", model="r1", max_concurrency=2),
        ]
    )
    parts = split_teachers(cfg, 9, 3)
    assert [cap for _, cap in parts] == [3, 3, 3]
    for name in "abc":
        specs = [t for c, _ in parts for t in c.teachers if t.name == name]
        orig = next(t for t in cfg.teachers if t.name == name)
        assert sum(t.max_concurrency for t in specs) == orig.max_concurrency
        for t in specs:
            frac = t.max_concurrency / orig.max_concurrency
            assert t.rpm == (orig.rpm * frac if orig.rpm else None)
            assert t.tpm == (orig.tpm * frac if orig.tpm else None)
    assert all(c.teachers and c.key_model == cfg.key_model == "r1+r1-b" for c, _ in parts)
    with pytest.raises(ValueError, match="no request slot"):
        split_teachers(cfg, 2, 3)


def test_workers_take_every_pending_row_exactly_once_from_a_shared_cursor():
    """Two workers' cursors over one shared index: each row is handed out once, in order,
    whichever worker asks, and both see the end."""
    import multiprocessing as mp

    from pipeline.generate.workers import _cursor

    rows = [f"row{i}" for i in range(7)]
    shared = mp.get_context().Value("q", 0)
    a, b = _cursor(rows, shared), _cursor(rows, shared)
    got = [a(), a(), b(), a(), b(), b(), a()]
    assert got == rows
    assert a() is None and b() is None


def test_sending_gc_restores_the_collector():
    import gc

    from pipeline.generate.runner import GC_THRESHOLD, sending_gc

    before = gc.get_threshold()
    with sending_gc():
        assert gc.get_threshold()[0] == GC_THRESHOLD and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_budget_holds_over_processes_sharing_it():
    """--max-requests / --budget-tokens: each claim counts one request; once either limit is
    reached every sharer is refused, with the limit that stopped it."""
    import multiprocessing as mp

    from pipeline.generate.state import Budget

    shared = mp.get_context().Array("q", 2)
    a, b = Budget(3, None, shared), Budget(3, None, shared)
    assert [a.claim(), b.claim(), a.claim()] == [None, None, None]
    assert b.claim() == a.claim() == "--max-requests 3 reached"
    tokens = Budget(None, 100)
    assert tokens.claim() is None
    tokens.spend(100)
    assert tokens.claim() == "--budget-tokens 100 reached"


def test_run_state_merges_workers_parts():
    from collections import Counter

    from pipeline.generate.state import EndpointTally, RunState, Snapshot

    a = RunState(done=2, accepted=1, rejected=1, sent=3, tokens=10, retries=Counter(x=1))
    a.endpoints = {"t": EndpointTally(3, 1, 4)}
    b = RunState(done=1, accepted=1, sent=1, reused=2, tokens=5, stopped="--max-requests 4")
    b.failed, b.endpoints = {"k"}, {"t": EndpointTally(1, 0, 4), "u": EndpointTally(2, 0, 1)}
    total = RunState(total=9, stopped=None)
    for part in (a, b):
        total.merge(part)
    assert total.snapshot(in_flight=2) == Snapshot(3, 2, 1, 4, 2, 15, 2)
    assert total.snapshot() == a.snapshot() + b.snapshot()
    assert total.retries == Counter(x=1) and total.failed == {"k"} and total.total == 9
    assert total.stopped == "--max-requests 4"
    assert total.endpoints == {"t": EndpointTally(4, 1, 8), "u": EndpointTally(2, 0, 1)}


# -- streamed bodies ----------------------------------------------------------------------
def _sse(*events: dict | str, sep: bytes = b"\n") -> bytes:
    out = b""
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)
        out += b"data: " + data.encode() + sep + sep
    return out


def test_sse_body_folds_deltas_usage_and_finish_reason():
    from pipeline.generate.client import parse_sse

    first = {"role": "assistant", "reasoning_content": "想"}
    body = (
        b": keep-alive\n\n"
        + _sse(
            {"model": "r1", "choices": [{"delta": first}]},
            {"choices": [{"delta": {"reasoning_content": "一想"}, "finish_reason": None}]},
            {"choices": [{"delta": {"content": "财经"}, "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
            "[DONE]",
        )
        + b"data: not json after the end\n\n"
    )
    raw = parse_sse(body)
    assert raw == {
        "content": "财经",
        "reasoning_content": "想一想",
        "reasoning": None,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 9, "completion_tokens": 4},
        "model": "r1",
    }
    # CRLF line ends, event/id fields, an event split over two data lines, no final blank line
    crlf = (
        b"event: message\r\nid: 1\r\n"
        + _sse({"choices": [{"delta": {"reasoning": "a\nb"}}]}, sep=b"\r\n")
        + b'data: {"choices": [{"delta":\r\ndata: {"content": "x"}}]}'
    )
    raw = parse_sse(crlf)
    assert raw["reasoning"] == "a\nb" and raw["content"] == "x" and raw["finish_reason"] is None
    assert (
        parse_sse(b"")
        == parse_sse(b": keep-alive\n\n")
        == {
            "content": "",
            "reasoning_content": None,
            "reasoning": None,
            "finish_reason": None,
            "usage": None,
            "model": None,
        }
    )
    for broken in (b"data: {not json\n\n", b'data: {"error": {"message": "x"}}\n\n'):
        with pytest.raises(ValueError):
            parse_sse(broken)
