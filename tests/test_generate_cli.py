"""``distill generate`` through its command line: errors, secrets, budgets, samples, filters."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pipeline.generate.command import generate
from tests.conftest import HEADLINES, NEWS_TASK, sample_input

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SECRET = "sk-SENTINEL-7f3a9c1e55d0b2"
app = typer.Typer()
app.command()(generate)


def invoke(srv, inp: Path, out: Path, *extra: str, env: dict | None = None):
    args = [
        "--task",
        str(NEWS_TASK),
        "--input",
        str(inp),
        "--out",
        str(out),
        "--quiet",
        "--retry-base",
        "0.05",
    ]
    if srv is not None:
        args += ["--teacher-url", srv.base_url, "--teacher-model", srv.model]
    return CliRunner().invoke(app, [*args, *extra], env=env)


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text("utf-8"))


def test_bad_input_exits_with_file_line_and_expectation(tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(
        '{"id": "1", "title": "央行降准", "label": "财经"}\n{"id": "2", "title": \n', "utf-8"
    )
    res = invoke(
        None, inp, tmp_path / "o", "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"
    )
    assert res.exit_code == 2
    assert f"{inp}:2: expected one JSON object per line" in res.output
    inp.write_text('{"id": "1", "title": "央行降准", "label": "天气"}\n', "utf-8")
    res = invoke(
        None, inp, tmp_path / "o", "--teacher-url", "http://127.0.0.1:9/v1", "--teacher-model", "m"
    )
    assert res.exit_code == 2 and f"{inp}:1: unknown gold label '天气'" in res.output
    assert "Traceback" not in res.output


def test_wrong_model_is_a_clear_fatal_error(standin, tmp_path):
    srv = standin()
    inp = sample_input(tmp_path, 3)
    res = invoke(
        None, inp, tmp_path / "o", "--teacher-url", srv.base_url, "--teacher-model", "no-such-model"
    )
    assert res.exit_code == 2
    assert "answered HTTP 404" in res.output and "no-such-model" in res.output


def test_api_key_never_leaks(standin, tmp_path):
    """The key is used, but reaches no output file, log line or error message."""
    srv = standin(faults="429=0.2,500=0.1,truncate=0.2,retry_after=0.1", latency_ms=5)
    inp = sample_input(tmp_path, 10)
    env = {**os.environ, "TEACHER_KEY": SECRET, "PYTHONWARNINGS": "always"}
    seen: list[bytes] = []
    for url in (srv.base_url, "http://127.0.0.1:9/v1"):  # a working and an unreachable teacher
        out = tmp_path / f"out{len(seen)}"
        args = ["--task", str(NEWS_TASK), "--input", str(inp), "--out", str(out)]
        args += ["--teacher-url", url, "--teacher-model", srv.model, "--api-key-env"]
        args += ["TEACHER_KEY", "--retry-base", "0.01", "--max-attempts", "2", "--timeout", "5"]
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.generate.command", *args],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        seen += [proc.stdout + proc.stderr, *(p.read_bytes() for p in out.rglob("*"))]
    # a teacher that refuses the request: the error message is shown, the key is not
    res = invoke(
        None,
        inp,
        tmp_path / "o404",
        "--teacher-url",
        srv.base_url,
        "--teacher-model",
        "no-such-model",
        "--api-key-env",
        "TEACHER_KEY",
        env=env,
    )
    assert res.exit_code == 2 and "HTTP 404" in res.output
    seen.append(res.output.encode())
    assert len(seen) > 10  # outputs, ledgers, captured logs
    assert not [s for s in seen if SECRET.encode() in s]
    res = invoke(srv, inp, tmp_path / "o", "--api-key-env", "UNSET_KEY_VAR", env={})
    assert res.exit_code == 2 and "UNSET_KEY_VAR is not set" in res.output


def test_max_requests_and_budget_stop_cleanly_then_resume(standin, tmp_path):
    srv = standin(latency_ms=5)
    inp, out = sample_input(tmp_path, 20, start=200), tmp_path / "out"
    res = invoke(srv, inp, out, "--max-requests", "7", "--concurrency", "3")
    assert res.exit_code == 0, res.output
    first = stats(out)
    assert first["run"]["requests_sent"] == len(srv.requests()) == 7
    assert not first["complete"] and first["pending"] == 20 - 7
    assert first["run"]["stopped"].startswith("--max-requests 7")
    json.loads((out / "train.json").read_text("utf-8"))  # whole, valid files
    res = invoke(srv, inp, out, "--budget-tokens", "1", "--concurrency", "2")
    second = stats(out)
    assert 1 <= second["run"]["requests_sent"] <= 2  # what was in flight when it ran out
    assert second["run"]["stopped"].startswith("--budget-tokens")
    res = invoke(srv, inp, out)
    final = stats(out)
    assert final["complete"] and final["pending"] == 0
    sent = first["run"]["requests_sent"] + second["run"]["requests_sent"]
    assert final["run"]["requests_sent"] == 20 - sent
    assert len({e["key"] for e in srv.requests()}) == len(srv.requests()) == 20
    assert final["tokens"]["total"] > 0 and final["tokens"]["reasoning"] > 0


def test_samples_with_gold_match_and_a_changed_filter_reuses_answers(standin, tmp_path):
    srv = standin(faults="offlabel=0.15", latency_ms=5)
    inp, out = sample_input(tmp_path, 60, start=300), tmp_path / "out"
    assert invoke(srv, inp, out, "--test-ratio", "0").exit_code == 0
    plain = stats(out)
    n_plain = len(srv.requests())
    assert plain["run"]["requests_sent"] == n_plain == 60
    # same requests, stricter filter: answers come from the ledger, no new request
    res = invoke(srv, inp, out, "--test-ratio", "0", "--require-gold-match")
    assert res.exit_code == 0, res.output
    strict = stats(out)
    assert strict["run"]["requests_sent"] == 0 and len(srv.requests()) == n_plain
    assert strict["accepted"] < plain["accepted"]
    assert strict["rejected_by_reason"].get("gold_mismatch", 0) > 0
    # up to 3 samples per input: first passing sample kept, later ones never asked
    res = invoke(srv, inp, out, "--test-ratio", "0", "--require-gold-match", "--samples", "3")
    sampled = stats(out)
    assert sampled["accepted"] > strict["accepted"]
    rows = [json.loads(x) for x in inp.read_text("utf-8").splitlines()]
    gold = {r["id"]: r["label"] for r in rows}
    train = json.loads((out / "train.json").read_text("utf-8"))
    assert all(r["label"] == gold[r["id"]] for r in train)
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text("utf-8").splitlines()]
    per_row = {}
    for r in rejects:
        per_row.setdefault(r["id"], []).append(r["sample"])
    accepted = {r["id"] for r in train}
    for row_id, samples in per_row.items():
        # a row's rejected samples are 0..k-1 when sample k passed, 0..2 when none did
        expected = list(range(len(samples))) if row_id in accepted else [0, 1, 2]
        assert samples == expected, row_id
    asked_per_row = {i: len(per_row.get(i, [])) + (i in accepted) for i in gold}
    asked = len(srv.requests()) - n_plain
    assert asked == sampled["run"]["requests_sent"] == sum(asked_per_row.values()) - 60 > 0


def test_several_endpoints_share_work_and_ledger_and_price_gives_cost(standin, tmp_path):
    """Two endpoints serving one model split the work; answers stored through one endpoint are
    reused through another (the ledger key has the model, not the URL); price -> cost."""
    a, b = standin(latency_ms=30), standin(latency_ms=30)
    inp, out = sample_input(tmp_path, 30, start=400), tmp_path / "out"
    assert invoke(a, inp, out, "--max-requests", "10").exit_code == 0
    teachers = tmp_path / "teachers.yaml"
    teachers.write_text(
        "teachers:\n"
        + "".join(
            f"  - name: {name}\n    base_url: {srv.base_url}\n    model: {srv.model}\n"
            f"    max_concurrency: 4\n    price_per_million: {{input: 2.0, output: 8.0}}\n"
            for name, srv in (("a", a), ("b", b))
        ),
        "utf-8",
    )
    res = invoke(None, inp, out, "--teachers", str(teachers))
    assert res.exit_code == 0, res.output
    s = stats(out)
    assert (
        s["complete"] and s["run"]["requests_sent"] == 20 and s["run"]["reused_from_ledger"] == 10
    )
    assert len(a.requests()) > 10 and len(b.requests()) > 0
    assert len(a.requests()) + len(b.requests()) == 30
    with sqlite3.connect(out / "ledger.sqlite") as db:
        priced = db.execute(
            "SELECT SUM(prompt_tokens), SUM(completion_tokens) FROM responses "
            "WHERE endpoint IN ('a', 'b')"
        ).fetchone()
    assert s["cost"] == pytest.approx((priced[0] * 2.0 + priced[1] * 8.0) / 1e6)


def test_tokenizer_gives_reasoning_length_in_tokens(standin, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        HEADLINES.read_text("utf-8").splitlines(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]),
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    srv = standin()
    out = tmp_path / "out"
    res = invoke(srv, sample_input(tmp_path, 6), out, "--tokenizer", str(tmp_path / "tok"))
    assert res.exit_code == 0, res.output
    s = stats(out)
    chars, tokens = s["reasoning_chars"], s["reasoning_tokens"]
    assert tokens is not None and tokens["p50"] > 0
    assert tokens["max"] != chars["max"]  # counted in tokens, not characters
    res = invoke(srv, sample_input(tmp_path, 6), tmp_path / "o2", "--tokenizer", "/no/such/dir")
    assert res.exit_code == 2 and "/no/such/dir: expected a folder" in res.output
    assert len(srv.requests()) == 6  # refused before asking the teacher
