"""``distill demo``: re-running is cheap (finished stages are skipped) and its helpers are right.

The whole demo is too slow for CI; its wall time and figures are reported in the lead's notes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.demo import (
    Paths,
    answer_token_budget,
    has_teacher_labels,
    target_checks,
    trained_as,
)
from tests.conftest import ROOT


def _finished_run(out):
    """Markers of a finished demo run, and an eval summary as ``distill eval`` writes it."""
    paths = Paths(out)
    for marker in (
        paths.data / "stats.json",
        paths.base / "config.json",
        paths.adapter / "adapter_config.json",
        paths.student / "distill_manifest.json",
    ):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    paths.eval.mkdir(parents=True)
    (paths.eval / "summary.json").write_text(json.dumps(_summary()))
    point = {"budget": "8", "n": 90, "accuracy": 0.61, "format_rate": 1.0, "label_rate": 1.0,
             "latency_p50_s": 0.2, "reasoning_tokens_mean": 8.0, "errors": 0}  # fmt: skip
    sweep = {"budgets": ["8"], "endpoints": {"student": [point]}}
    (paths.out / "budget").mkdir()
    (paths.out / "budget" / "budget.json").write_text(json.dumps(sweep))
    return paths


def _summary(bare_accuracy=0.69, bare_format=1.0, base_format=0.0):
    """An eval summary as ``distill eval`` writes it: with-prompt figures, bare ones under
    ``bare``."""
    entry = {"n": 90, "format_rate": 1.0, "canonical_rate": 1.0, "accuracy": 0.7, "macro_f1": 0.69}
    entry["prompt_tokens_mean"] = 152.0
    bare = {**entry, "accuracy": bare_accuracy, "format_rate": bare_format}
    bare["prompt_tokens_mean"] = 92.0
    base = {**entry, "format_rate": base_format, "accuracy": 0.05}
    return {
        "base": {**base, "bare": {**base, "format_rate": 0.0}},
        "student": {**entry, "bare": bare},
    }


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_prints_the_table(tmp_path):
    paths = _finished_run(tmp_path / "demo")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "demo", "--out", str(paths.out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for stage in ("generate", "tiny-model", "train", "merge", "eval", "budget sweep"):
        assert f"{stage}:" in done.stderr and "skipped" in done.stderr
    assert "student" in done.stdout and "0.700" in done.stdout  # the table, from summary.json
    assert "user only" in done.stdout and "0.690" in done.stdout  # ... both conditions
    assert "✗" not in done.stdout and done.stdout.count("✓") == 5  # every target met
    assert "reasoning budget sweep" in done.stdout and "0.610" in done.stdout  # budget.json
    assert str(paths.eval / "report.md") in done.stdout.replace("\n", "")
    assert not (paths.logs / "teacher.log").exists()  # nothing was started


def test_teacher_labels_detected(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "a", "label": "体育", "teacher_label": None}]))
    assert has_teacher_labels(path)
    path.write_text(json.dumps([{"instruction": "a", "label": "体育"}]))
    assert not has_teacher_labels(path)


def test_answer_token_budget_covers_the_longest_training_answer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    base = tmp_path / "base"
    base.mkdir()
    tok.save(str(base / "tokenizer.json"))
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"output": "a b a"}, {"output": " ".join(["a"] * 40)}]
    (data / "train.json").write_text(json.dumps(rows))
    assert answer_token_budget(data, base) == 60 + 16  # 1.5 x 40 tokens, plus slack


@pytest.mark.parametrize(
    ("summary", "missed"),
    [
        (_summary(), []),
        (_summary(bare_accuracy=0.65), ["vs with the system prompt"]),  # 0.05 below with-prompt
        (_summary(bare_accuracy=0.59), ["user message only: 0.590", "vs with the system"]),
        (_summary(bare_format=0.97), ["student format rate"]),
        (_summary(base_format=0.01), ["base format rate, with the system prompt"]),
        (
            {"student": {"accuracy": 0.7}},  # no bare figures, no base: nothing passes
            ["format rate, user message only: missing", "missing", "missing", "base", "base"],
        ),
    ],
)
def test_targets_judge_the_student_as_clients_ask(summary, missed):
    failed = [what for ok, what in target_checks(summary) if not ok]
    assert len(failed) == len(missed), failed
    for part, what in zip(missed, failed, strict=True):
        assert part in what


def test_an_adapter_trained_otherwise_is_not_reused(tmp_path):
    adapter = tmp_path / "adapter"
    assert trained_as(adapter, "drop")  # nothing there yet: nothing to redo
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert trained_as(adapter, None) and not trained_as(adapter, "drop")  # no metrics: unknown
    (adapter / "train_metrics.json").write_text(json.dumps({"system_prompt": "keep"}))
    assert trained_as(adapter, "keep") and not trained_as(adapter, "drop")
