"""A short real train -> merge -> vLLM CPU -> openai SDK; plus metrics and resume.

The fixture student (tests/fixtures_vllm.py) is trained for a few dozen optimizer steps on a
small homogeneous set with one fixed reasoning shape, enough for greedy decoding to emit the
answer format reliably; here every reply must pass our own normaliser (``split_think`` +
``task.read_label``), i.e. be ``<think>…</think>`` followed by one of the task's labels.
"""

from __future__ import annotations

import json

import pytest

from distill_common.think import is_canonical, split_think
from tests.fixtures_vllm import ROOT, news_rows, student_rows, write_alpaca


@pytest.mark.slow
def test_vllm_serves_the_merged_student(vllm_server, news_task):
    from openai import OpenAI

    client = OpenAI(base_url=vllm_server.base_url, api_key="unused", timeout=60)
    assert [m.id for m in client.models.list().data] == ["student"]
    rows = student_rows()[::8]  # one headline per label
    for row in rows:
        reply = client.chat.completions.create(
            model=vllm_server.model,
            messages=news_task.messages(row),
            temperature=0,
            max_tokens=96,
        )
        choice = reply.choices[0]
        text = choice.message.content
        parts = split_think(text)
        assert choice.finish_reason == "stop", text  # stopped at <|im_end|>, not max_tokens
        assert parts.closed and parts.reasoning, text
        assert news_task.read_label(parts.answer) is not None, text
        assert is_canonical(text.strip()), text


def test_train_metrics_record_the_run(tiny_student):
    metrics = json.loads((tiny_student.parent / "adapter" / "train_metrics.json").read_text())
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert len(losses) >= 2 and losses[-1] < losses[0] / 2  # it learned
    assert metrics["tokens_per_second"] > 0 and metrics["train_runtime_s"] > 0
    assert metrics["num_examples"] == len(student_rows())
    assert (tiny_student.parent / "adapter" / "loss.png").stat().st_size > 1000


def test_interrupted_training_resumes_from_checkpoint(tiny_base, tmp_path, news_task):
    from pipeline.train.config import load_config
    from pipeline.train.sft import train

    write_alpaca(news_task, news_rows()[:8], tmp_path / "data")
    config = load_config(ROOT / "configs" / "train" / "tiny-cpu.yaml").model_copy(
        update={"per_device_batch_size": 4, "save_steps": 1, "logging_steps": 1}
    )
    out = tmp_path / "adapter"
    first = train(
        config.model_copy(update={"max_steps": 2}), tmp_path / "data", out, str(tiny_base)
    )
    assert first["resumed_from"] is None and (out / "checkpoint-2").is_dir()
    # a second run with the same --out picks up checkpoint-2 and only runs the rest
    again = train(
        config.model_copy(update={"max_steps": 3}), tmp_path / "data", out, str(tiny_base)
    )
    assert again["resumed_from"].endswith("checkpoint-2")
    assert again["global_steps"] == 3
    steps = [h["step"] for h in again["log_history"] if "loss" in h]
    assert steps == [1, 2, 3]  # history carried over from the checkpoint, not retrained
