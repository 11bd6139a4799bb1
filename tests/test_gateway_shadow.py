"""Shadow traffic (issue 13): the stand-in serves as both the student (upstream) and the teacher.

The student stand-in reads a lexicon with two labels' words swapped and answers off-label now
and then, so the student and the teacher disagree on some rows, as a drifted student would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import openai
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from distill_common.task import load_task
from gateway.flywheel import Flywheel, answer_text, fields_of
from gateway.shadow import Shadow, ShadowSettings, TeacherRef
from gateway.tasks import TaskRegistry
from tests.conftest import ROOT, free_port

TASK = ROOT / "configs/tasks/news.yaml"
SECRET = "sk-shadow-secret-4242"
PARAMS = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}


def _rows(n: int, skip: int = 0) -> list[dict]:
    lines = (ROOT / "data/news/headlines.jsonl").read_text().splitlines()[skip : skip + n]
    return [orjson.loads(line) for line in lines]


def _swapped_lexicon(tmp: Path) -> Path:
    lex = yaml.safe_load((ROOT / "pipeline/standin/lexicon.yaml").read_text())
    labels = lex["labels"]
    labels["体育"], labels["娱乐"] = labels["娱乐"], labels["体育"]
    path = tmp / "swapped.yaml"
    path.write_text(yaml.safe_dump(lex, allow_unicode=True))
    return path


def _counts(metrics: str, model: str = "student") -> dict[str, int]:
    out: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("gateway_shadow_total{") and f'model="{model}"' in line:
            outcome = line.split('outcome="')[1].split('"')[0]
            if value := int(float(line.rsplit(" ", 1)[1])):
                out[outcome] = value
    return out


def _wait_counts(gw, total: int, timeout: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(gw.metrics())
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.1)


def _shadow_env(monkeypatch, teacher_url: str, model: str, **extra: object) -> None:
    monkeypatch.setenv("SHADOW_TEST_KEY", SECRET)
    monkeypatch.setenv(
        "GATEWAY_SHADOW_TEACHER", f"url={teacher_url},model={model},key_env=SHADOW_TEST_KEY"
    )
    monkeypatch.setenv("GATEWAY_SHADOW_RATE", "1.0")
    monkeypatch.setenv("GATEWAY_SHADOW_MAX_RPM", "100000")
    for name, value in extra.items():
        monkeypatch.setenv(f"GATEWAY_SHADOW_{name.upper()}", str(value))


# -- units ---------------------------------------------------------------------------------------


def test_off_by_default_and_teacher_setting_errors(monkeypatch):
    for name in list(os.environ):
        if name.startswith("GATEWAY_SHADOW_"):
            monkeypatch.delenv(name)
    settings = ShadowSettings()
    assert not settings.enabled and settings.log is None
    assert settings.params == PARAMS  # the same sampling parameters `distill generate` keys by
    ref = TeacherRef.parse("url=http://t:8000/v1,model=r1,key_env=K")
    assert (ref.url, ref.model, ref.key_env) == ("http://t:8000/v1", "r1", "K")
    with pytest.raises(ValueError, match="model="):
        TeacherRef.parse("url=http://t/v1")
    with pytest.raises(ValueError, match="not url="):
        TeacherRef.parse("url=http://t/v1,model=m,key=sk-123")
    with pytest.raises(ValueError, match="unset"):
        TeacherRef(url="http://t/v1", model="m", key_env="SURELY_UNSET_VAR_X").api_key()


def test_fields_of_inverts_the_user_template():
    task = load_task(TASK)
    assert fields_of(task, "新闻分类:国足2比0取胜 ") == {"title": "国足2比0取胜"}
    assert fields_of(task, "帮我写首诗") is None
    assert fields_of(task, "新闻分类: ") is None


def test_flywheel_is_private_and_rotates(tmp_path):
    fw = Flywheel(tmp_path / "fw" / "shadow.jsonl", max_bytes=2048, backups=2)
    for i in range(200):
        fw.write({"title": f"标题{i}\u2028续", "n": i})
    files = sorted((tmp_path / "fw").iterdir())
    assert [f.name for f in files] == ["shadow.jsonl", "shadow.jsonl.1", "shadow.jsonl.2"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.stat().st_size <= 2048
        lines = f.read_text().splitlines()  # U+2028 escaped: one record per line for generate
        assert all(orjson.loads(line)["title"].endswith("\u2028续") for line in lines)
    assert orjson.loads(files[0].read_text().splitlines()[-1])["n"] == 199


def test_queue_bound_holds_under_a_burst(standin_factory):
    """A slow teacher, one call in flight, a queue of 8: a burst is dropped and counted, and
    memory stays flat however big the burst."""
    teacher = standin_factory(latency_ms=30000)
    settings = ShadowSettings(
        teacher=f"url={teacher.base_url},model={teacher.model}",
        rate=1.0,
        max_in_flight=1,
        queue=8,
        max_rpm=100000,
    )
    registry = CollectorRegistry()
    shadow = Shadow(settings, TaskRegistry.load({"student": TASK}), registry)
    messages = [{"role": "user", "content": "新闻分类:国足2比0取胜"}]
    student = "<think>\n体育\n</think>\n\n体育"

    async def burst() -> tuple[int, int, float]:
        await shadow.start()
        await asyncio.sleep(0.2)
        tracemalloc.start()
        for _ in range(2000):
            shadow.submit("student", messages, student)
        small = tracemalloc.get_traced_memory()[0]
        for _ in range(20000):
            shadow.submit("student", messages, student)
        big = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        t = time.monotonic()
        await shadow.stop()
        return small, big, time.monotonic() - t

    small, big, stop_s = asyncio.run(burst())
    dropped = registry.get_sample_value(
        "gateway_shadow_total", {"model": "student", "outcome": "dropped"}
    )
    assert dropped >= 22000 - 8 - 1  # all but the queue and the one call taken from it
    assert big - small < 64 * 1024  # ten times the burst, no more memory held
    assert stop_s < 5  # the 30 s teacher call is cancelled on shutdown


# -- through the gateway ------------------------------------------------------------------------


def test_agreement_counts_equal_the_offline_comparison(
    tmp_path, standin_factory, gateway, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    teacher = standin_factory()
    student = standin_factory(
        model="student", lexicon=_swapped_lexicon(tmp_path), faults="offlabel=0.15"
    )
    fw_path = tmp_path / "shadow" / "flywheel.jsonl"
    _shadow_env(monkeypatch, teacher.base_url, teacher.model, log=fw_path)
    gw = gateway(upstreams=student.base_url, tasks=f"student={TASK}", api_keys="sk-client")
    task = load_task(TASK)
    client = openai.OpenAI(base_url=gw.base_url, api_key="sk-client", max_retries=0)
    rows = _rows(40)
    student_labels = []
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": task.render_user(row)}]
        if i % 2:
            text = client.chat.completions.create(model="student", messages=messages)
            msg = text.choices[0].message
            student_labels.append(
                task.label_of(answer_text({**(msg.model_extra or {}), "content": msg.content}))
            )
        else:
            parts = {"content": [], "reasoning_content": []}
            for chunk in client.chat.completions.create(
                model="student", messages=messages, stream=True
            ):
                for choice in chunk.choices:
                    extra = choice.delta.model_extra or {}
                    parts["content"].append(choice.delta.content or "")
                    parts["reasoning_content"].append(extra.get("reasoning_content") or "")
            student_labels.append(
                task.label_of(answer_text({k: "".join(v) for k, v in parts.items()}))
            )
    counts = _wait_counts(gw, len(rows))

    # Offline: ask the teacher the same rows directly, compare labels as eval does.
    direct = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
    expected = {"agree": 0, "disagree": 0, "student_invalid": 0, "teacher_invalid": 0}
    for row, s_label in zip(rows, student_labels, strict=True):
        out = direct.chat.completions.create(
            model=teacher.model, messages=task.messages(row), seed=0, **PARAMS
        )
        msg = out.choices[0].message
        t_label = task.label_of(answer_text({**(msg.model_extra or {}), "content": msg.content}))
        outcome = (
            "teacher_invalid"
            if t_label is None
            else "student_invalid"
            if s_label is None
            else "agree"
            if s_label == t_label
            else "disagree"
        )
        expected[outcome] += 1
    assert expected["disagree"] > 0 and expected["student_invalid"] > 0 and expected["agree"] > 0
    assert counts == {k: v for k, v in expected.items() if v}

    # The flywheel: every non-agreement, in generate's input format, private; no key anywhere.
    assert stat.S_IMODE(fw_path.stat().st_mode) == 0o600
    logged = [orjson.loads(line) for line in fw_path.read_text().splitlines()]
    assert len(logged) == len(rows) - expected["agree"]
    assert all(r["shadow"]["outcome"] != "agree" and r["title"] for r in logged)
    teacher_seen = teacher.requests()
    assert len(teacher_seen) >= 2 * len(rows)  # the shadow's calls plus the offline ones
    for text in (gw.metrics(), gw.access_log.read_text(), fw_path.read_text(), caplog.text):
        assert SECRET not in text
    gw.stop()


@pytest.mark.parametrize("fault", ["down", "429", "500", "slow"])
def test_no_client_error_whatever_the_teacher_does(
    fault, tmp_path, standin_factory, gateway, monkeypatch
):
    student = standin_factory(model="student")
    if fault == "down":
        url, model = f"http://127.0.0.1:{free_port()}/v1", "r1"
    else:
        opts = {"latency_ms": 30000} if fault == "slow" else {"faults": f"{fault}=1.0"}
        teacher = standin_factory(**opts)
        url, model = teacher.base_url, teacher.model
    _shadow_env(monkeypatch, url, model, max_in_flight=2, queue=4)
    gw = gateway(upstreams=student.base_url, tasks=f"student={TASK}")
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    task = load_task(TASK)
    for row in _rows(12):
        messages = [{"role": "user", "content": task.render_user(row)}]
        for stream in (False, True):
            t = time.perf_counter()
            out = client.chat.completions.create(model="student", messages=messages, stream=stream)
            if stream:
                list(out)
            assert time.perf_counter() - t < 5
    if fault == "slow":
        counts = _counts(gw.metrics())
        assert counts.get("dropped", 0) >= 24 - 2 - 4  # bounded: the rest waits, then drops
        t = time.monotonic()
        gw.stop()
        assert time.monotonic() - t < 8  # shutdown does not wait for the 30 s teacher
    else:
        assert _wait_counts(gw, 24) == {"teacher_error": 24}


def test_import_then_generate_pays_for_no_answer_twice(tmp_path, standin_factory):
    """Shadow answers imported into the ledger: `generate` over the same inputs asks the teacher
    nothing for them (counted in the stand-in's request log)."""
    teacher = standin_factory()
    student_text = "<think>\n想想\n</think>\n\n无法判断"  # invalid: every row is logged
    fw_path = tmp_path / "flywheel.jsonl"
    settings = ShadowSettings(
        teacher=f"url={teacher.base_url},model={teacher.model}",
        rate=1.0,
        max_rpm=100000,
        log=fw_path,
    )
    shadow = Shadow(settings, TaskRegistry.load({"student": TASK}), CollectorRegistry())
    task = load_task(TASK)
    rows = _rows(12, skip=100)

    async def run() -> list[str | None]:
        await shadow.start()
        try:
            return [
                await shadow.shadow_one(
                    "student", [{"role": "user", "content": task.render_user(r)}], student_text
                )
                for r in rows
            ]
        finally:
            await shadow.stop()

    assert asyncio.run(run()) == ["student_invalid"] * len(rows)
    asked = len(teacher.requests())
    assert asked == len(rows)
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "pipeline", "generate", "--task", str(TASK), "--input", str(fw_path),
        "--out", str(out), "--teacher-url", teacher.base_url, "--teacher-model", teacher.model,
        "--import-shadow", str(fw_path), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"imported {len(rows)}," in done.stderr
    assert len(teacher.requests()) == asked  # nothing asked again
    stats = orjson.loads((out / "stats.json").read_bytes())
    assert stats["run"]["requests_sent"] == 0
    assert stats["run"]["reused_from_ledger"] == len(rows)
    assert stats["accepted"] + stats["rejected"] + stats["teacher_on_test"]["rows"] == len(rows)
    # A second import finds them all already there.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert f"imported 0, already in the ledger {len(rows)}" in done.stderr
    assert len(teacher.requests()) == asked
    # Answers asked with other sampling parameters stand for other requests: not imported.
    other = [*cmd, "--temperature", "0.7", "--max-requests", "0", "--out", str(tmp_path / "o")]
    done = subprocess.run(other, env=env, capture_output=True, text=True, timeout=120)
    assert f"imported 0, already in the ledger 0, other teacher/params {len(rows)}" in done.stderr


def test_compose_shadow_is_off_and_asks_the_teacher_generate_asks(monkeypatch):
    from tests.test_compose import distill_argv, option, render

    def shadow_of(env: dict[str, str] | None = None) -> tuple[ShadowSettings, list[str]]:
        s = render(env=env)["services"]  # .env.example's api-teacher profile
        for name, value in s["gateway"]["environment"].items():
            monkeypatch.setenv(name, value)
        return ShadowSettings(), distill_argv(s["generate"])

    # (the local-teacher profile's teacher lives only inside generate's run: nothing to shadow)
    for env in (None, {"TEACHER_URL": "http://teacher:8000/v1", "TEACHER_MODEL": "r1-local"}):
        settings, gen = shadow_of(env)
        assert not settings.enabled and settings.log is None  # off by default
        ref = TeacherRef.parse(settings.teacher)
        assert (ref.url, ref.model) == (
            option(gen, "--teacher-url"),
            option(gen, "--teacher-model"),
        )
        assert ref.key_env == option(gen, "--api-key-env")
    settings, _ = shadow_of({"GATEWAY_SHADOW_RATE": "0.05"})
    assert settings.enabled and settings.rate == 0.05


@pytest.mark.slow
def test_agreement_with_a_real_vllm_student_equals_eval_offline(
    gateway, vllm_server, standin_factory, monkeypatch
):
    """The fixture student on vLLM CPU behind the gateway: the live counts equal an offline
    comparison that asks the student (greedy, as eval does) and the teacher directly."""
    from pipeline.evaluate import response_text

    teacher = standin_factory()
    _shadow_env(monkeypatch, teacher.base_url, teacher.model)
    gw = gateway(upstreams=vllm_server.base_url, tasks=f"student={TASK}")
    task = load_task(TASK)
    rows = [r for r in _rows(400) if r["label"] in ("体育", "财经", "科技", "汽车")][:12]
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    direct = openai.OpenAI(base_url=vllm_server.base_url, api_key="x", max_retries=0)
    oracle = openai.OpenAI(base_url=teacher.base_url, api_key="x", max_retries=0)
    expected: dict[str, int] = {}
    for i, row in enumerate(rows):
        messages = task.messages(row)
        kw = {"model": "student", "messages": messages, "temperature": 0.0, "max_tokens": 96}
        out = client.chat.completions.create(**kw, stream=bool(i % 2))
        if i % 2:
            list(out)
        msg = direct.chat.completions.create(**kw).choices[0].message
        s_label = task.label_of(response_text({**(msg.model_extra or {}), "content": msg.content}))
        msg = (
            oracle.chat.completions.create(model=teacher.model, messages=messages, seed=0, **PARAMS)
            .choices[0]
            .message
        )
        t_label = task.label_of(response_text({**(msg.model_extra or {}), "content": msg.content}))
        outcome = (
            "teacher_invalid" if t_label is None
            else "student_invalid" if s_label is None
            else "agree" if s_label == t_label
            else "disagree"
        )  # fmt: skip
        expected[outcome] = expected.get(outcome, 0) + 1
    assert expected.get("agree", 0) > 0, expected  # the student answers in format
    assert _wait_counts(gw, len(rows), timeout=120) == expected
