"""``distill eval``: metrics on hand-made cases, and a real run against stand-in endpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distill_common.think import format_answer, join_reasoning, split_think
from pipeline.evaluate import (
    EvalError,
    class_report,
    load_rows,
    macro_f1,
    parse_endpoint,
    percentile,
    score_text,
)
from tests.conftest import NEWS_TASK, ROOT, free_port

# Hand-written headlines with gold labels (a few the stand-in's lexicon will miss or confuse).
HEADLINES = [
    ("国足世预赛客场两球击败对手,晋级形势好转", "体育"),
    ("央行宣布下调存款准备金率0.25个百分点", "财经"),
    ("沪指午后拉升,券商板块集体涨停", "证券"),
    ("新能源车企发布纯电SUV,续航突破800公里", "汽车"),
    ("多地高考成绩今日放榜,志愿填报指南出炉", "教育"),
    ("国产大模型开源,推理速度提升三倍", "科技"),
    ("海军舰艇编队完成远海实战化训练", "军事"),
    ("暑期旅游升温,海岛游预订量同比翻番", "旅游"),
    ("联合国大会通过气候变化决议", "国际"),
    ("小麦夏收基本结束,全国粮食产量稳中有增", "农业"),
    ("热门手游推出新版本,电竞联赛同步开赛", "游戏"),
    ("一线城市调整限购政策,新房成交量回升", "房产"),
    ("导演新作定档春节,主演阵容曝光", "娱乐"),
    ("故宫博物院推出古籍修复特展", "文化"),
    ("社区食堂开进老旧小区,老人吃饭不再难", "民生"),
    ("这件事让整个小镇都沉默了", "民生"),
]


def write_test_split(path: Path, news_task, *, teacher: bool = False) -> list[dict]:
    rows = []
    for title, label in HEADLINES:
        row = {
            "system": news_task.system_prompt,
            "instruction": news_task.render_user({"title": title}),
            "input": "",
            "output": format_answer("我想想。", label),
            "label": label,
        }
        if teacher:
            row["teacher_label"] = label if len(rows) % 4 else "民生"
        rows.append(row)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return rows


# ------------------------------------------------------------------ metric functions


def test_macro_f1_and_per_class_on_known_values():
    gold = ["体育", "体育", "财经", "财经"]
    pred = ["体育", "财经", "财经", None]
    per = class_report(gold, pred, ["体育", "财经", "军事"])
    assert per["体育"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert per["财经"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per["军事"]["f1"] == 0.0 and per["军事"]["support"] == 0
    # 军事 occurs nowhere, so it does not dilute the macro average; the missing label is no class.
    assert macro_f1(gold, pred, ["体育", "财经", "军事"]) == pytest.approx((2 / 3 + 0.5) / 2)
    # A predicted label that has no gold rows counts as a class with F1 0.
    assert macro_f1(["体育"], ["军事"], ["体育", "军事"]) == 0.0
    assert macro_f1(["体育", "财经"], ["体育", "财经"], ["体育", "财经", "军事"]) == 1.0


def test_percentile_interpolates_like_numpy():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 95) == pytest.approx(3.85)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize(
    ("text", "label", "format_ok", "canonical"),
    [
        ("<think>\n因为有比分。\n</think>\n\n体育", "体育", True, True),
        ("  <think>因为有比分。</think>体育\n", "体育", True, False),  # loose whitespace
        ("因为有比分。\n</think>\n\n体育", "体育", True, False),  # no opening tag
        ("体育", "体育", False, False),  # a bare label: accurate but no reasoning
        ("<think>\n\n</think>\n\n体育", "体育", False, False),  # empty reasoning
        ("<think>\n因为有比分。\n\n体育", None, False, False),  # unclosed: no label
        ("<think>\n因为有比分。\n</think>\n\n体育新闻", None, False, False),  # not a label
        ("<think>\n因为<think>有比分。\n</think>\n\n体育", "体育", False, False),  # stray tag
        ("", None, False, False),
    ],
)
def test_score_text_reads_label_and_shape(news_task, text, label, format_ok, canonical):
    scored = score_text(text, news_task)
    assert (scored.label, scored.format_ok, scored.canonical) == (label, format_ok, canonical)


@pytest.mark.parametrize(
    ("spec", "url", "model"),
    [
        ("student=http://127.0.0.1:8000/v1@student", "http://127.0.0.1:8000/v1", "student"),
        ("base=http://127.0.0.1:8000", "http://127.0.0.1:8000/v1", None),
        (
            "x=https://api.example.com/compatible-mode/v1/@m-1",
            "https://api.example.com/compatible-mode/v1",
            "m-1",
        ),
        (
            "r1=https://api.deepseek.com@deepseek-reasoner",
            "https://api.deepseek.com/v1",
            "deepseek-reasoner",
        ),
    ],
)
def test_parse_endpoint(spec, url, model):
    ep = parse_endpoint(spec)
    assert (ep.base_url, ep.model) == (url, model)


@pytest.mark.parametrize("spec", ["student", "=http://x", "a=ftp://x", "a b=http://x", "a="])
def test_parse_endpoint_rejects_bad_specs(spec):
    with pytest.raises(EvalError, match="--endpoint"):
        parse_endpoint(spec)


def test_bad_rows_name_file_and_row(tmp_path, news_task):
    path = tmp_path / "test.json"
    path.write_text(
        json.dumps([{"instruction": "新闻分类:a", "label": "体育"}, {"instruction": "x"}])
    )
    with pytest.raises(EvalError, match=r"test\.json: row 1: .*'label'"):
        load_rows(path, news_task)
    path.write_text(json.dumps([{"instruction": "新闻分类:a", "label": "天气"}]))
    with pytest.raises(EvalError, match=r"row 0: gold label '天气' is not one of"):
        load_rows(path, news_task)
    path.write_text("[{]")
    with pytest.raises(EvalError, match=r"test\.json: not valid JSON at line 1"):
        load_rows(path, news_task)


# ------------------------------------------------------------------ real endpoints


def _label_from_raw(message: dict, labels: list[str]) -> str | None:
    """The label of a raw chat message, read here without pipeline.evaluate."""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    parts = split_think(join_reasoning(reasoning, message.get("content")))
    if not (parts.closed or parts.reasoning is None):
        return None
    answer = parts.answer.strip(" \t\r\n。.!！")
    return answer if answer in labels else None


@pytest.mark.slow
def test_eval_against_standin_endpoints(tmp_path, standin, news_task):
    from pipeline.standin.persona import Persona, load_lexicon

    data = tmp_path / "test.json"
    rows = write_test_split(data, news_task, teacher=True)
    servers = {
        "rc": standin(reasoning_format="reasoning_content"),
        "rs": standin(reasoning_format="reasoning"),
        "noopen": standin(reasoning_format="inline-no-open"),
        "broken": standin(reasoning_format="inline", faults="broken=1.0"),
    }
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "pipeline", "eval", "--data", str(data), "--out", str(out)]
    cmd += ["--task", str(NEWS_TASK), "--concurrency", "4"]
    for name, srv in servers.items():
        model = "" if name == "rs" else f"@{srv.model}"  # rs: model from /v1/models
        cmd += ["--endpoint", f"{name}={srv.base_url}{model}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "report.md" in done.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"rc", "rs", "noopen", "broken", "teacher"}
    persona = Persona(load_lexicon())
    gold = [label for _, label in HEADLINES]
    expected = [persona.think(title).label for title, _ in HEADLINES]
    for name, srv in servers.items():
        s = summary[name]
        preds = [
            json.loads(line)
            for line in (out / f"predictions_{name}.jsonl").read_text().splitlines()
        ]
        assert len(preds) == s["n"] == len(rows)
        assert [p["index"] for p in preds] == list(range(len(rows)))
        labels = [_label_from_raw(p["message"], news_task.labels) for p in preds]
        assert s["accuracy"] == pytest.approx(
            sum(a == g for a, g in zip(labels, gold, strict=True)) / len(rows)
        )
        assert s["invalid_rate"] == pytest.approx(labels.count(None) / len(rows))
        assert s["latency_p50_s"] > 0 and s["latency_p95_s"] >= s["latency_p50_s"]
        assert s["errors"] == 0
        assert len(srv.requests()) == len(rows)  # one request per row, no retries
        if name != "broken":
            # A clean endpoint answers what the stand-in's persona decides, in the right shape.
            assert labels == expected
            assert s["format_rate"] == 1.0
            assert s["reasoning_chars_mean"] > 20
        assert set(s["per_class"]) == set(news_task.labels)
    # Every reasoning shape is read to the same answers.
    assert summary["rc"]["accuracy"] == summary["rs"]["accuracy"] == summary["noopen"]["accuracy"]
    assert 0 < summary["rc"]["accuracy"] < 1  # the stand-in is deliberately imperfect
    assert summary["rc"]["canonical_rate"] == 1.0  # server-split reasoning rebuilds canonically
    assert summary["broken"]["format_rate"] == 0.0
    teacher = summary["teacher"]
    assert teacher["n"] == len(rows)
    assert teacher["accuracy"] == pytest.approx(12 / 16)  # rows 0, 4, 8, 12 are wrong (民生)
    assert teacher["format_rate"] == 1.0

    report = (out / "report.md").read_text()
    for name in summary:
        assert f"| {name} |" in report
        png = out / f"confusion_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        with Image.open(png) as img:
            assert img.size[0] > 400 and img.size[1] > 400


@pytest.mark.slow
def test_eval_cli_errors_are_clear(tmp_path, news_task):
    data = tmp_path / "test.json"
    write_test_split(data, news_task)
    base = [
        sys.executable,
        "-m",
        "pipeline",
        "eval",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    done = subprocess.run(
        [
            *base,
            "--endpoint",
            "a=http://127.0.0.1:1@m",
            "--api-key-env",
            "DISTILL_TEST_NO_SUCH_KEY",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "DISTILL_TEST_NO_SUCH_KEY" in done.stderr and "empty" in done.stderr


@pytest.mark.slow
def test_unreachable_endpoint_is_reported_not_hidden(tmp_path, news_task):
    data = tmp_path / "test.json"
    write_test_split(data, news_task)
    out = tmp_path / "o"
    base = [sys.executable, "-m", "pipeline", "eval", "--data", str(data), "--out", str(out)]
    dead = f"http://127.0.0.1:{free_port()}/v1"
    # Without a model name eval must ask /v1/models first, and says it cannot.
    done = subprocess.run(
        [*base, "--endpoint", f"a={dead}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "cannot list models" in done.stderr and "NAME=URL@MODEL" in done.stderr
    # With one, every row is recorded as an error and the command fails after writing.
    done = subprocess.run(
        [*base, "--endpoint", f"a={dead}@m", "--retries", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "every request failed for a" in done.stderr
    s = json.loads((out / "summary.json").read_text())["a"]
    assert s["errors"] == s["n"] == len(HEADLINES) and s["accuracy"] == 0.0


@pytest.mark.slow
def test_eval_a_real_vllm_student(tmp_path, vllm_server, news_task):
    """The shared vLLM CPU fixture: inline `<think>` text (no reasoning parser) scores as format."""
    from tests.fixtures_vllm import STUDENT_LABELS, news_rows

    held_out = []
    for label in STUDENT_LABELS:
        rows = [r for r in news_rows() if r["label"] == label]
        held_out += rows[8:11] or rows[:3]  # the fixture trains on the first 8 per label
    data = tmp_path / "test.json"
    records = [
        {
            "system": news_task.system_prompt,
            "instruction": news_task.render_user(r),
            "input": "",
            "output": "",
            "label": r["label"],
        }
        for r in held_out
    ]
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "pipeline", "eval", "--data", str(data), "--out", str(out)]
    cmd += ["--task", str(NEWS_TASK), "--max-tokens", "96"]
    cmd += ["--endpoint", f"student={vllm_server.base_url}@{vllm_server.model}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    s = json.loads((out / "summary.json").read_text())["student"]
    preds = [json.loads(x) for x in (out / "predictions_student.jsonl").read_text().splitlines()]
    assert s["n"] == len(preds) == len(held_out) and s["errors"] == 0
    assert all(set(p["message"]) == {"content"} for p in preds)  # vLLM: no reasoning split
    labels = [_label_from_raw(p["message"], news_task.labels) for p in preds]
    gold = [r["label"] for r in held_out]
    assert s["accuracy"] == pytest.approx(
        sum(a == g for a, g in zip(labels, gold, strict=True)) / len(gold)
    )
    formatted = [score_text(p["message"]["content"], news_task).format_ok for p in preds]
    assert s["format_rate"] == pytest.approx(sum(formatted) / len(preds))
    assert s["format_rate"] >= 0.9  # the fixture student reliably writes the shape
    assert s["latency_p50_s"] > 0
