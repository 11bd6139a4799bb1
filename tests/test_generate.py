"""``distill generate`` end to end over real HTTP against the stand-in teacher."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from distill_common.think import is_canonical
from pipeline.generate.client import RetryPolicy
from pipeline.generate.inputs import read_inputs, split_rows
from pipeline.generate.run import GenerateOptions, run_generate
from pipeline.generate.teachers import TeachersConfig, TeacherSpec
from pipeline.standin.faults import FaultPlan
from pipeline.standin.faults import request_key as standin_key
from tests.conftest import NEWS_TASK, sample_input

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

DATA_FILES = [
    "train.json",
    "test.json",
    "train.sharegpt.jsonl",
    "dataset_info.json",
    "rejects.jsonl",
]
PARAMS = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}


def options(srv, inp: Path, out: Path, **kw) -> GenerateOptions:
    spec = TeacherSpec(
        name="standin",
        base_url=srv.base_url,
        model=srv.model,
        max_concurrency=kw.pop("concurrency", 16),
    )
    return GenerateOptions(
        task=NEWS_TASK,
        input=inp,
        out=out,
        teachers=TeachersConfig(teachers=[spec]),
        quiet=True,
        retry=RetryPolicy(max_attempts=10, base_s=0.05),
        **kw,
    )


def keys_by_row(news_task, inp: Path, model: str, samples: int = 1) -> dict[tuple[str, int], str]:
    """The stand-in's request key for each (row id, sample) this input produces."""
    rows = read_inputs(inp, news_task).rows
    return {
        (r.id, s): standin_key({"model": model, "messages": r.messages, "seed": s, **PARAMS})
        for r in rows
        for s in range(samples)
    }


def load(out: Path, name: str):
    text = (out / name).read_text("utf-8")
    if name.endswith(".json"):
        return json.loads(text)
    return [json.loads(x) for x in text.splitlines()]


def served(log: list[dict]) -> dict[str, int]:
    """How many times each request key got a full answer (200 and not an empty body)."""
    counts: dict[str, int] = defaultdict(int)
    for e in log:
        if e["status"] == 200 and "empty" not in (e["fault"] or ""):
            counts[e["key"]] += 1
    return counts


def test_faulty_teacher_run_completes_with_right_reasons(standin, tmp_path, news_task):
    spec = "429=0.2,500=0.05,empty=0.05,truncate=0.05,offlabel=0.05,keepalive=0.05,retry_after=1"
    srv = standin(faults=spec, latency_ms=20)
    inp, out = sample_input(tmp_path, 80), tmp_path / "out"
    stats = run_generate(options(srv, inp, out))

    plan = FaultPlan.parse(spec)
    keys = keys_by_row(news_task, inp, srv.model)
    log = srv.requests()
    assert {e["key"] for e in log} == set(keys.values())  # our key mapping is the server's
    assert max(served(log).values()) == 1  # no answered request was sent twice

    train, test = load(out, "train.json"), load(out, "test.json")
    rejects = {r["id"]: r for r in load(out, "rejects.jsonl")}
    rows = split_rows(read_inputs(inp, news_task).rows, test_ratio=0.15, seed=42)
    accepted = {r["id"] for r in train} | {r["id"] for r in test if r["output"]}
    expected_reason = {"truncate": "truncated", "offlabel": "label_not_in_set"}
    for row in rows:
        fault = plan.content(keys[(row.id, 0)])
        if fault is None:
            assert row.id in accepted, row.id
        else:
            assert rejects[row.id]["reason"] == expected_reason[fault], row.id
            assert rejects[row.id]["raw"]["finish_reason"] and rejects[row.id]["row"] == row.record
    assert stats["complete"] and stats["pending"] == 0
    assert (
        stats["accepted"] + stats["rejected"]
        == stats["inputs"]["train"]
        == len([r for r in rows if r.split == "train"])
    )
    assert len(test) == stats["inputs"]["test"] > 0
    assert stats["inputs"]["split"] == "seeded"
    assert set(stats["run"]["retries_by_reason"]) >= {"http_429", "http_500", "empty_body"}

    # Retry-After: a 429'd request comes back no sooner than 1 s later.
    by_key = defaultdict(list)
    for e in log:
        by_key[e["key"]].append(e)
    gaps = [
        b["ts"] - a["ts"]
        for events in by_key.values()
        for a, b in zip(
            sorted(events, key=lambda e: e["attempt"]),
            sorted(events, key=lambda e: e["attempt"])[1:],
            strict=False,
        )
        if a["status"] == 429
    ]
    assert gaps and min(gaps) >= 0.98, min(gaps)

    # The training data: canonical answers whose label is the one recorded.
    for rec in train:
        assert set(rec) >= {"system", "instruction", "input", "output", "id", "label"}
        assert is_canonical(rec["output"]) and news_task.label_of(rec["output"]) == rec["label"]
        assert rec["input"] == "" and rec["instruction"].startswith("新闻分类:")
    for rec in test:
        assert rec["label"] in news_task.labels
        assert rec["output"] == "" or news_task.label_of(rec["output"]) == rec["teacher_label"]
    sharegpt = load(out, "train.sharegpt.jsonl")
    assert [m["role"] for m in sharegpt[0]["messages"]] == ["system", "user", "assistant"]
    assert [r["messages"][2]["content"] for r in sharegpt] == [r["output"] for r in train]
    info = load(out, "dataset_info.json")
    for entry in info.values():
        assert (out / entry["file_name"]).exists()
    assert info["news_train_sharegpt"]["formatting"] == "sharegpt"
    assert info["news_train"]["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
    }


def test_every_reasoning_shape_streamed_or_not_gives_the_same_data(standin, tmp_path):
    """Four server shapes x streamed/whole (with keep-alive blank lines) -> one byte-identical
    training file: the canonical text does not depend on how the server shaped it."""
    inp = sample_input(tmp_path, 12)
    files, retried = {}, Counter()
    for fmt in ("reasoning_content", "reasoning", "inline", "inline-no-open"):
        srv = standin(reasoning_format=fmt, faults="keepalive=0.3,empty=0.1,500=0.1")
        for stream in (True, False):
            out = tmp_path / f"{fmt}-{stream}"
            stats = run_generate(options(srv, inp, out, stream=stream, test_ratio=0.0))
            files[(fmt, stream)] = (out / "train.json").read_bytes()
            retried.update(stats["run"]["retries_by_reason"])
        srv.stop()
    assert len(set(files.values())) == 1, [k for k in files if files[k] != files[(fmt, True)]]
    train = json.loads(files[(fmt, True)])
    assert len(train) == 12 and all(is_canonical(r["output"]) for r in train)
    assert retried["empty_body"] > 0 and retried["http_500"] > 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.generate.command", *args]


def _args(srv, inp: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--task",
        str(NEWS_TASK),
        "--input",
        str(inp),
        "--out",
        str(out),
        "--teacher-url",
        srv.base_url,
        "--teacher-model",
        srv.model,
        "--retry-base",
        "0.05",
        "--quiet",
        *extra,
    ]


def _ledger_keys(out: Path) -> set[tuple[str, int]]:
    try:
        with sqlite3.connect(f"file:{out / 'ledger.sqlite'}?mode=ro", uri=True) as db:
            return {(r, s) for r, s in db.execute("SELECT row_id, sample FROM responses")}
    except sqlite3.Error:
        return set()


KILL_FAULTS = "429=0.1,500=0.05,truncate=0.05,offlabel=0.05,retry_after=0.2"


def _reference_run(standin, tmp_path: Path, news_task, start: int):
    """60 input rows, their request keys, and the files of an uninterrupted run over them."""
    inp = sample_input(tmp_path, 60, start=start)
    keys = keys_by_row(news_task, inp, "deepseek-r1-standin")
    ref = tmp_path / "reference"
    ref_srv = standin(faults=KILL_FAULTS, latency_ms=0)
    subprocess.run(_cli(*_args(ref_srv, inp, ref)), check=True, timeout=60)
    return inp, keys, ref


def test_kill_9_then_resume_gives_identical_files_and_no_repeat_requests(
    standin, tmp_path, news_task
):
    inp, keys, ref = _reference_run(standin, tmp_path, news_task, start=100)
    srv = standin(faults=KILL_FAULTS, latency_ms=40)
    out = tmp_path / "killed"
    for kill_at in (3, 25, 60, None):  # early, mid-run, after the last answer, then finish
        before = {keys[k] for k in _ledger_keys(out)}
        t0 = time.time()
        if kill_at is None:
            subprocess.run(_cli(*_args(srv, inp, out)), check=True, timeout=60)
        else:
            proc = subprocess.Popen(_cli(*_args(srv, inp, out, "--concurrency", "4")))
            deadline = time.monotonic() + 60
            while len(_ledger_keys(out)) < kill_at and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        # a resumed run never re-asks what the ledger held when it started
        sent = {e["key"] for e in srv.requests() if e["ts"] >= t0}
        assert not sent & before, kill_at
    assert not sent  # the last kill came after every answer was stored
    # only requests in flight at a kill (<= 4 each time) can have been answered twice
    assert sum(n - 1 for n in served(srv.requests()).values()) <= 3 * 4

    for name in DATA_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = load(out, "stats.json"), load(ref, "stats.json")
    a.pop("run"), b.pop("run")
    assert a == b
    assert not list(out.glob(".*.tmp"))


def test_two_workers_give_the_same_files_and_send_each_request_once(standin, tmp_path):
    """--workers 2 splits the rows over two processes: --max-requests is exact over both,
    the resumed run sends each missing request once, and the files are one process's bytes."""
    srv = standin(faults=KILL_FAULTS, latency_ms=20)
    inp = sample_input(tmp_path, 60, start=300)
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_generate(options(srv, inp, one, concurrency=8, workers=1))

    t0 = time.time()
    part = run_generate(options(srv, inp, two, concurrency=8, workers=2, max_requests=7))
    assert part["run"]["requests_sent"] == 7 and "--max-requests 7" in part["run"]["stopped"]
    first = {e["key"] for e in srv.requests() if e["ts"] >= t0}
    assert len(first) == 7  # the budget holds over both workers together
    t1 = time.time()
    multi = run_generate(options(srv, inp, two, concurrency=8, workers=2))
    log = [e for e in srv.requests() if e["ts"] >= t1]
    assert multi["run"]["requests_sent"] == 53 and not {e["key"] for e in log} & first
    assert len(served(log)) == 53 and max(served(log).values()) == 1  # each answered once
    assert multi["run"]["retries_by_reason"].get("http_429", 0) > 0
    assert sum(e["attempts"] for e in multi["run"]["endpoints"].values()) == len(log)
    for name in DATA_FILES:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    single.pop("run"), multi.pop("run")
    assert multi == single


def _workers_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (a generate run's workers), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_9_of_the_parent_kills_its_workers_and_resume_repeats_nothing(
    standin, tmp_path, news_task
):
    inp, keys, ref = _reference_run(standin, tmp_path, news_task, start=200)
    srv = standin(faults=KILL_FAULTS, latency_ms=40)
    out = tmp_path / "killed"
    for kill_at in (5, 35, None):
        before = {keys[k] for k in _ledger_keys(out)}
        t0 = time.time()
        args = _args(srv, inp, out, "--concurrency", "6", "--workers", "2")
        if kill_at is None:
            subprocess.run(_cli(*args), check=True, timeout=60)
        else:
            proc = subprocess.Popen(_cli(*args))
            deadline = time.monotonic() + 60
            workers: set[int] = set()
            while len(_ledger_keys(out)) < kill_at and proc.poll() is None:
                assert time.monotonic() < deadline
                workers |= set(_workers_of(proc.pid))
                time.sleep(0.01)
            workers |= set(_workers_of(proc.pid))
            assert len(workers) == 2
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            gone = time.monotonic() + 5
            while any(_alive(w) for w in workers):  # the workers die with their parent
                assert time.monotonic() < gone, "a worker outlived its killed parent"
                time.sleep(0.01)
        sent = {e["key"] for e in srv.requests() if e["ts"] >= t0}
        assert not sent & before, kill_at  # nothing the ledger held is asked again
    # only requests in flight at a kill (<= 6 each time) can have been answered twice
    assert sum(n - 1 for n in served(srv.requests()).values()) <= 2 * 6

    for name in DATA_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
