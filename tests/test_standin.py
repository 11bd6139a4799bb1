"""The stand-in teacher: persona, fault plan, and the real HTTP server driven by the openai SDK."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from distill_common.think import join_reasoning, split_think
from pipeline.standin.faults import FaultPlan, FaultSpecError, request_key
from pipeline.standin.persona import (
    DEFAULT_LEXICON,
    LexiconError,
    Persona,
    headline_of,
    load_lexicon,
)

FORMATS = ["reasoning_content", "reasoning", "inline", "inline-no-open"]

KEYWORDS = {
    "民生": ["社区", "居民", "物业"],
    "文化": ["博物馆", "非遗", "文物"],
    "娱乐": ["电影", "明星", "定档"],
    "体育": ["国足", "世预赛", "冠军", "比赛"],
    "财经": ["经济", "央行", "营收"],
    "房产": ["楼市", "房价", "二手房"],
    "汽车": ["汽车", "新能源车", "车型"],
    "教育": ["高考", "学校", "招生"],
    "科技": ["芯片", "人工智能", "大模型"],
    "军事": ["导弹", "演习", "航母"],
    "旅游": ["景区", "游客", "黄金周"],
    "国际": ["叙利亚", "联合国", "外交"],
    "证券": ["A股", "股价", "涨停"],
    "农业": ["小麦", "水稻", "春耕"],
    "游戏": ["电竞", "手游", "英雄联盟"],
}
HEADLINES = [
    "国足客场2比1逆转叙利亚,晋级世预赛下一阶段",
    "某车企股价连续三日涨停,新能源车销量创新高",
    "英雄联盟全球总决赛落幕,中国战队夺得冠军",
    "今天下午有一场小雨,出门记得带伞",  # no keyword: an unsure guess
]


@pytest.fixture
def lexicon_file(tmp_path: Path, news_task) -> Path:
    assert set(KEYWORDS) == set(news_task.labels)
    path = tmp_path / "lexicon.yaml"
    path.write_text(yaml.safe_dump({"labels": KEYWORDS}, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def persona(lexicon_file: Path) -> Persona:
    return Persona(load_lexicon(lexicon_file))


def news(headline: str) -> list[dict]:
    return [
        {"role": "system", "content": "分类"},
        {"role": "user", "content": f"新闻分类:{headline}"},
    ]


def ask(client: openai.OpenAI, model: str, headline: str, *, stream: bool, **kw) -> tuple[str, str]:
    """One chat call; returns (text readable by split_think, finish_reason)."""
    if not stream:
        resp = client.chat.completions.create(model=model, messages=news(headline), **kw)
        msg = resp.choices[0].message
        reasoning = getattr(msg, "reasoning_content", None) or getattr(msg, "reasoning", None)
        return join_reasoning(reasoning, msg.content), resp.choices[0].finish_reason
    reasoning, content, finish = [], [], None
    for chunk in client.chat.completions.create(
        model=model, messages=news(headline), stream=True, **kw
    ):
        for choice in chunk.choices:
            d = choice.delta
            reasoning.append(
                getattr(d, "reasoning_content", None) or getattr(d, "reasoning", None) or ""
            )
            content.append(d.content or "")
            finish = choice.finish_reason or finish
    return join_reasoning("".join(reasoning) or None, "".join(content)), finish


# ---- persona (no server) ----------------------------------------------------------------


def test_headline_is_text_after_first_colon():
    assert headline_of("新闻分类:国足晋级") == "国足晋级"
    assert headline_of("新闻分类：国足晋级:下一轮") == "国足晋级:下一轮"
    assert headline_of("国足晋级") == "国足晋级"


def test_reasoning_cites_matches_and_rejects_runner_up(persona):
    thought = persona.think(HEADLINES[0])
    assert thought.label == "体育" and thought.confident
    first, *_, last = thought.reasoning.splitlines()
    assert "国足" in thought.reasoning and "世预赛" in thought.reasoning
    assert "叙利亚" in thought.reasoning and "国际" in thought.reasoning  # the runner-up, weighed
    assert first.startswith(("嗯", "好的")) and "不过" in thought.reasoning
    assert last.startswith("所以") and last.endswith("体育。")


def test_longer_keywords_weigh_more(persona):
    assert persona.think("股价").label == "证券"
    assert persona.think("新能源车股价").label == "汽车"  # 4 characters beat 2
    assert persona.think("英雄联盟冠军赛").label == "游戏"
    assert persona.think("冠军赛英雄联盟").label == "游戏"  # the order of words does not matter


def test_no_match_is_a_deterministic_unsure_guess(persona):
    a = persona.think(HEADLINES[3])
    assert not a.confident and a.label in KEYWORDS
    assert "不太确定" in a.reasoning or "没什么把握" in a.reasoning
    assert persona.think(HEADLINES[3]) == a


def test_sampling_seed_varies_text_deterministically(persona):
    texts = {persona.think(HEADLINES[0], seed).reasoning for seed in range(12)}
    assert len(texts) >= 3
    assert persona.think(HEADLINES[0], 7) == persona.think(HEADLINES[0], 7)
    # an unsure guess may change between samples, a confident label does not
    assert {persona.think(HEADLINES[0], s).label for s in range(12)} == {"体育"}
    assert len({persona.think(HEADLINES[3], s).label for s in range(12)}) > 1
    # a close call (电竞 for 游戏, 比赛 for 体育) sometimes flips when sampled, never when greedy
    assert persona.think("电竞比赛").label == "体育"  # a tie goes to the lexicon's first label
    assert {persona.think("电竞比赛", s).label for s in range(20)} == {"体育", "游戏"}


def test_bad_lexicon_names_file_and_field(tmp_path):
    bad = tmp_path / "lex.yaml"
    bad.write_text("labels:\n  体育: []\n  游戏: [电竞]\n", encoding="utf-8")
    with pytest.raises(LexiconError, match=r"lex\.yaml.*体育.*no keywords"):
        load_lexicon(bad)
    bad.write_text("labels: [体育\n", encoding="utf-8")
    with pytest.raises(LexiconError, match=r"lex\.yaml: line 2 not valid YAML"):
        load_lexicon(bad)


@pytest.mark.slow
def test_shipped_lexicon_is_the_default_and_covers_the_task(standin, news_task):
    assert DEFAULT_LEXICON.exists(), f"{DEFAULT_LEXICON} is missing"
    assert set(load_lexicon().labels) == set(news_task.labels)
    srv = standin()  # no --lexicon: the shipped one
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    text, finish = ask(client, srv.model, "国足主场击败对手,晋级世界杯决赛圈", stream=True)
    assert finish == "stop" and news_task.label_of(text) == "体育"


# ---- fault plan -------------------------------------------------------------------------


def test_fault_spec_errors_say_what_is_expected():
    for spec, msg in [
        ("429=x", "expected NAME=NUMBER"),
        ("teapot=0.1", "unknown fault 'teapot'"),
        ("500=1.5", "not in"),
        ("429=0.6,500=0.6", "sum to 1.2"),
    ]:
        with pytest.raises(FaultSpecError, match=msg):
            FaultPlan.parse(spec)


def test_fault_draws_are_reproducible_and_independent_per_attempt():
    plan = FaultPlan.parse("429=0.5,truncate=0.5", seed=3)
    keys = [f"k{i}" for i in range(400)]
    first = [plan.transport(k, 1) for k in keys]
    assert first == [FaultPlan.parse("429=0.5,truncate=0.5", seed=3).transport(k, 1) for k in keys]
    assert 150 < first.count("429") < 250
    second = [plan.transport(k, 2) for k in keys]
    both = sum(a == b == "429" for a, b in zip(first, second, strict=True))
    assert 60 < both < 140  # independent draws: about a quarter of keys fail twice
    content = [plan.content(k) for k in keys]  # drawn per request, whatever the attempt
    assert 150 < content.count("truncate") < 250
    reseeded = [FaultPlan.parse("truncate=0.5", seed=4).content(k) for k in keys]
    assert 120 < sum(a != b for a, b in zip(content, reseeded, strict=True)) < 280


def test_request_key_ignores_stream_options_only():
    body = {"model": "m", "messages": news("x"), "seed": 1}
    assert request_key(body) == request_key({**body, "stream": True, "stream_options": {}})
    assert request_key(body) != request_key({**body, "seed": 2})
    assert len(request_key(body)) == 16


# ---- the server over real HTTP ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_reasoning_shape_splits_into_reasoning_and_label(
    standin, lexicon_file, news_task, fmt
):
    srv = standin(reasoning_format=fmt, lexicon=lexicon_file)
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    for headline in HEADLINES:
        plain, finish = ask(client, srv.model, headline, stream=False)
        streamed, sfinish = ask(client, srv.model, headline, stream=True)
        assert plain == streamed and finish == sfinish == "stop"
        parts = split_think(plain)
        assert parts.closed and parts.reasoning and not parts.anomalies
        assert news_task.label_of(plain) in news_task.labels
    raw = httpx.post(
        f"{srv.base_url}/chat/completions",
        json={"model": srv.model, "messages": news(HEADLINES[0])},
    ).json()
    message = raw["choices"][0]["message"]
    if fmt in ("reasoning_content", "reasoning"):
        assert message[fmt] and message["content"] == "体育" and "<think>" not in message[fmt]
    elif fmt == "inline":
        assert message["content"].startswith("<think>\n") and message["content"].endswith(
            "\n</think>\n\n体育"
        )
    else:
        assert not message["content"].startswith("<think>") and message["content"].endswith(
            "\n</think>\n\n体育"
        )
    assert len(srv.requests()) == 2 * len(HEADLINES) + 1


@pytest.mark.slow
def test_same_body_same_text_and_usage(standin, lexicon_file):
    srv = standin(lexicon=lexicon_file)
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    same = {
        ask(client, srv.model, HEADLINES[2], stream=False, temperature=0.6, seed=1)[0]
        for _ in range(3)
    }
    assert len(same) == 1
    samples = {
        ask(client, srv.model, HEADLINES[2], stream=False, temperature=0.6, seed=s)[0]
        for s in range(8)
    }
    assert len(samples) > 1
    greedy = {
        ask(client, srv.model, HEADLINES[2], stream=False, temperature=0, seed=s)[0]
        for s in range(4)
    }
    assert len(greedy) == 1
    resp = client.chat.completions.create(model=srv.model, messages=news(HEADLINES[0]))
    usage = resp.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=srv.model,
            messages=news(HEADLINES[0]),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.model_dump() == usage.model_dump()
    rows = srv.requests()
    keys = [r["key"] for r in rows]
    assert len(rows) == 3 + 8 + 4 + 2
    assert keys[0] == keys[1] == keys[2] and [r["attempt"] for r in rows[:3]] == [1, 2, 3]
    assert keys[-1] == keys[-2] and rows[-1]["stream"] and not rows[-2]["stream"]


@pytest.mark.slow
def test_injected_faults_appear_at_their_rates(standin, lexicon_file, news_task):
    srv = standin(
        lexicon=lexicon_file,
        reasoning_format="inline",
        faults="429=0.2,500=0.05,empty=0.05,keepalive=0.1,truncate=0.1,offlabel=0.1,broken=0.1,retry_after=2",
    )
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    seen: Counter[str] = Counter()
    n = 300
    for i in range(n):
        headline = HEADLINES[i % len(HEADLINES)]
        try:
            text, finish = ask(client, srv.model, headline, stream=bool(i % 2), seed=i)
        except openai.RateLimitError as e:
            assert (
                e.response.headers["retry-after"] == "2" and e.body["code"] == "rate_limit_exceeded"
            )
            seen["429"] += 1
            continue
        except openai.InternalServerError as e:
            assert e.status_code == 500 and e.body["type"] == "server_error"
            seen["500"] += 1
            continue
        except (openai.APIResponseValidationError, ValueError):
            seen["empty"] += 1  # non-stream 200 with an empty body: the SDK cannot decode it
            continue
        if not text:
            seen["empty"] += 1  # a stream that closed without data
            continue
        parts = split_think(text)
        label = news_task.label_of(text)
        if finish == "length":
            assert "</think>" not in text and not parts.closed and label is None
            seen["truncate"] += 1
        elif parts.closed and not parts.anomalies and label is None:
            assert parts.reasoning and parts.answer not in news_task.labels
            seen["offlabel"] += 1
        elif label is None or parts.anomalies:
            seen["broken"] += 1
        else:
            seen["ok"] += 1
    rows = srv.requests()
    assert len(rows) == n
    logged = Counter(
        (r["fault"] or "ok").replace("keepalive+", "").replace("keepalive", "ok") for r in rows
    )
    assert seen == logged
    for fault, rate in [("429", 0.2), ("500", 0.05), ("empty", 0.05)]:
        assert 0.5 * rate * n <= seen[fault] <= 1.6 * rate * n, (fault, seen)
    served = n - seen["429"] - seen["500"] - seen["empty"]
    for fault in ("truncate", "offlabel", "broken"):
        assert 0.5 * 0.1 * served <= seen[fault] <= 1.6 * 0.1 * served, (fault, seen)
    assert sum("keepalive" in (r["fault"] or "") for r in rows) > 0.05 * n
    assert Counter(r["status"] for r in rows)[429] == seen["429"]


@pytest.mark.slow
def test_truncation_in_a_reasoning_field_leaves_no_answer(standin, lexicon_file):
    srv = standin(lexicon=lexicon_file, faults="truncate=1")
    full = Persona(load_lexicon(lexicon_file)).think(HEADLINES[0]).reasoning
    body = {"model": srv.model, "messages": news(HEADLINES[0])}
    choice = httpx.post(f"{srv.base_url}/chat/completions", json=body).json()["choices"][0]
    partial = choice["message"]["reasoning_content"]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == ""
    assert partial and full.startswith(partial) and len(partial) < len(full)
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    chunks = list(client.chat.completions.create(stream=True, **body))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert not any(c.choices[0].delta.content for c in chunks)
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed == partial


@pytest.mark.slow
def test_keepalive_lines_do_not_break_the_sdk(standin, lexicon_file):
    srv = standin(
        lexicon=lexicon_file, faults="keepalive=1", latency_ms=200, reasoning_format="reasoning"
    )
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    for stream, beat in [(False, b"\n"), (True, b": keep-alive\n\n")]:
        body = {"model": srv.model, "messages": news(HEADLINES[0]), "stream": stream}
        with httpx.stream("POST", f"{srv.base_url}/chat/completions", json=body) as r:
            assert next(r.iter_raw()) == beat  # sent before the latency is over
        text, finish = ask(client, srv.model, HEADLINES[0], stream=stream)
        assert finish == "stop" and split_think(text).answer == "体育"


@pytest.mark.slow
def test_retries_succeed_and_latency_is_applied(standin, lexicon_file):
    srv = standin(lexicon=lexicon_file, faults="429=0.5,retry_after=0.05", latency_ms=150)
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=8)
    for headline in HEADLINES:
        text, finish = ask(client, srv.model, headline, stream=True)
        assert finish == "stop" and split_think(text).closed
    rows = srv.requests()
    per_key = Counter(r["key"] for r in rows)
    assert len(per_key) == len(HEADLINES) and len(rows) > len(HEADLINES)
    for key, count in per_key.items():
        attempts = [r for r in rows if r["key"] == key]
        assert [r["attempt"] for r in attempts] == list(range(1, count + 1))
        assert [r["status"] for r in attempts] == [429] * (count - 1) + [200]
    with httpx.Client() as h:
        r = h.post(
            f"{srv.base_url}/chat/completions",
            json={"model": srv.model, "messages": news(HEADLINES[0]), "seed": 99},
        )
        while r.status_code == 429:
            r = h.post(
                f"{srv.base_url}/chat/completions",
                json={"model": srv.model, "messages": news(HEADLINES[0]), "seed": 99},
            )
        assert r.elapsed.total_seconds() >= 0.15


@pytest.mark.slow
def test_errors_use_openai_shape(standin, lexicon_file):
    srv = standin(lexicon=lexicon_file, model="r1-test")
    client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
    assert [m.id for m in client.models.list()] == ["r1-test"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="r1-test", messages=news("x"), n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-x", messages=news("x"))
    r = httpx.post(f"{srv.base_url}/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    text, finish = ask(client, "r1-test", HEADLINES[0], stream=False, max_tokens=20)
    assert finish == "length" and split_think(text).answer == ""  # cut before the label
    assert [r["status"] for r in srv.requests()] == [400, 404, 400, 200]


def test_bad_options_fail_before_serving(tmp_path):
    from typer.testing import CliRunner

    from pipeline.standin.__main__ import app

    wide = {"COLUMNS": "500"}  # no wrapping inside the error panel
    bad = CliRunner().invoke(app, ["--port", "1", "--faults", "teapot=0.1"], env=wide)
    assert bad.exit_code == 2 and "unknown fault 'teapot'" in bad.output
    missing = tmp_path / "nope.yaml"
    bad = CliRunner().invoke(app, ["--port", "1", "--lexicon", str(missing)], env=wide)
    assert bad.exit_code == 2 and f"{missing}: cannot read lexicon" in bad.output
