"""Session fixtures for a real tiny student served by vLLM CPU (one server per test session).

* ``tiny_base``: a tiny random-init Qwen2 (``distill tiny-model``), built once per session.
* ``tiny_student``: that base after a short real LoRA train on a small homogeneous synthetic
  set, merged (``distill merge``) - a directory vLLM can serve. It is trained long enough that
  greedy decoding reliably emits ``<think>…</think>\\n\\n<label>``.
* ``vllm_server``: ``python -m vllm.entrypoints.openai.api_server`` on ``tiny_student``
  (served as ``student``), torn down with its process group at the end of the session.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from distill_common.task import Task, load_task
from distill_common.think import format_answer

ROOT = Path(__file__).resolve().parents[1]
NEWS_TASK = ROOT / "configs" / "tasks" / "news.yaml"
HEADLINES = ROOT / "data" / "news" / "headlines.jsonl"

# A few headlines of our own, used when data/news/headlines.jsonl is not there.
FALLBACK_HEADLINES = [
    ("国足客场二比一逆转取胜,晋级亚洲杯八强", "体育"),
    ("女排联赛总决赛开打,卫冕冠军首战告捷", "体育"),
    ("马拉松赛事报名火爆,十万人抽签争名额", "体育"),
    ("乒乓球世锦赛落幕,中国队包揽五项冠军", "体育"),
    ("央行宣布下调存款准备金率零点五个百分点", "财经"),
    ("三季度居民消费价格指数同比上涨百分之零点四", "财经"),
    ("多家银行下调存款利率,理财产品收益走低", "财经"),
    ("外贸出口连续五个月增长,贸易顺差扩大", "财经"),
    ("新款国产芯片量产,性能比上一代提升一倍", "科技"),
    ("人工智能大模型开源,开发者可免费下载使用", "科技"),
    ("卫星互联网完成组网测试,偏远地区可上网", "科技"),
    ("量子计算机原型机实现新突破,运算速度刷新纪录", "科技"),
    ("新能源车企发布续航千公里的纯电轿车", "汽车"),
    ("十月汽车销量同比增长,插电混动车型走俏", "汽车"),
    ("多地推出购车补贴,以旧换新最高补一万元", "汽车"),
    ("自动驾驶出租车在三座城市开放试运营", "汽车"),
]


def news_rows() -> list[dict]:
    """``{"id","title","label"}`` rows: the project's headlines, or the fallback above."""
    if HEADLINES.exists():
        rows = [json.loads(line) for line in HEADLINES.read_text("utf-8").splitlines() if line]
        if rows:
            return rows
    return [
        {"id": f"h{i}", "title": t, "label": lb} for i, (t, lb) in enumerate(FALLBACK_HEADLINES)
    ]


def synthetic_reasoning(row: dict) -> str:
    """A short, label-bearing think section (a stand-in for the teacher's reasoning)."""
    return (
        f"标题是:{row['title']}。\n这条新闻说的是{row['label']}方面的事情,所以归为{row['label']}。"
    )


def write_alpaca(
    task: Task, rows: list[dict], out: Path, name: str = "train", reasoning=synthetic_reasoning
) -> Path:
    """Write rows in the generate stage's contract: ``OUT/<name>.json`` + ``dataset_info.json``."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for row in rows:
        system, user = task.messages(row)
        records.append(
            {
                "system": system["content"],
                "instruction": user["content"],
                "input": "",
                "output": format_answer(reasoning(row), row["label"]),
                "id": row["id"],
                "label": row["label"],
            }
        )
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), "utf-8")
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text("utf-8")) if info_path.exists() else {}
    info[f"news_{name}"] = {
        "file_name": path.name,
        "columns": {
            "system": "system",
            "prompt": "instruction",
            "query": "input",
            "response": "output",
        },
    }
    info_path.write_text(json.dumps(info, ensure_ascii=False, indent=1), "utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 base (random weights, task tokenizer), built once per session."""
    from pipeline.train.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    corpus = [HEADLINES] if HEADLINES.exists() else []
    return build_tiny_model(load_task(NEWS_TASK), out, corpus)


# The fixture student learns one short, fixed reasoning shape on four labels: a few dozen
# optimizer steps make greedy decoding emit `<think>\n…\n</think>\n\n<label>` reliably, which is
# what the serving tests need (not accuracy).
STUDENT_LABELS = ("体育", "财经", "科技", "汽车")
STUDENT_STEPS = 48


def student_rows() -> list[dict]:
    """A small homogeneous training set for the fixture student."""
    rows = [r for r in news_rows() if r["label"] in STUDENT_LABELS]
    by_label = {lb: [r for r in rows if r["label"] == lb][:8] for lb in STUDENT_LABELS}
    return [r for group in by_label.values() for r in group]


def short_reasoning(row: dict) -> str:
    """One fixed reasoning line: the fixture student must learn the shape in a few steps. It
    does not name the label, whose token would otherwise also end the answer, and a briefly
    trained model then stops right after it, inside the think section."""
    return "我看了标题里的关键词,判断出了它的类别。"


@pytest.fixture(scope="session")
def tiny_student(tiny_base, tmp_path_factory) -> Path:
    """``tiny_base`` after a short real LoRA train (trl) and a verified merge: a servable dir."""
    from pipeline.train.config import load_config
    from pipeline.train.merge import merge
    from pipeline.train.sft import train

    root = tmp_path_factory.mktemp("student")
    task = load_task(NEWS_TASK)
    rows = [{**r, "reasoning": short_reasoning(r)} for r in student_rows()]
    write_alpaca(task, rows, root / "data", reasoning=lambda r: r["reasoning"])
    config = load_config(ROOT / "configs" / "train" / "tiny-cpu.yaml").model_copy(
        update={"max_steps": STUDENT_STEPS, "per_device_batch_size": 8, "logging_steps": 8}
    )
    train(config, root / "data", root / "adapter", base=str(tiny_base), resume=False)
    merge(None, root / "adapter", root / "merged")
    return root / "merged"


@dataclass(frozen=True)
class VllmServer:
    """A running vLLM OpenAI-compatible server (see ``vllm_server``)."""

    base_url: str  # http://127.0.0.1:P/v1, for the openai SDK
    root_url: str  # http://127.0.0.1:P, for /health and /metrics
    model: str  # the served model name
    model_dir: Path
    log: Path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="session")
def vllm_server(tiny_student, tmp_path_factory):
    """vLLM CPU serving ``tiny_student`` as ``student`` through the project's own launcher
    (:func:`pipeline.serve.running_vllm`); one per session, stopped at the end."""
    from pipeline.serve import ServeError, running_vllm
    from tests.conftest import free_port

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    try:
        with running_vllm(
            tiny_student,
            served_model_name="student",
            host="127.0.0.1",
            port=free_port(),
            max_model_len=2048,  # the tiny model's own limit: long generations for abort tests
            log_path=log,
            startup_timeout=240,
            # below the tests and the gateway they run in-process: on 2 cores a busy vLLM
            # otherwise delays a test's hang-up by seconds (the abort tests race a generation)
            nice=10,
        ) as server:
            root_url = server.base_url.removesuffix("/v1")
            yield VllmServer(server.base_url, root_url, "student", tiny_student, log)
    except ServeError as e:
        pytest.fail(f"vLLM did not start: {e}\nlog tail:\n{_tail(log)}")
