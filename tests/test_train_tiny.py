"""`distill tiny-model`: an ordinary HF model dir with the task tokenizer and ChatML template."""

from __future__ import annotations

import json

from distill_common.think import format_answer
from tests.fixtures_vllm import HEADLINES, NEWS_TASK


def test_tiny_model_cli_builds_a_loadable_chatml_model(tmp_path, news_task):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from typer.testing import CliRunner

    from pipeline.cli import app

    corpus = tmp_path / "extra.txt"
    corpus.write_text("冰壶世界杯中国队夺冠\n")
    args = ["tiny-model", "--task", str(NEWS_TASK), "--out", str(tmp_path / "m")]
    args += ["--corpus", str(corpus), "--vocab-size", "1500"]
    if HEADLINES.exists():
        args += ["--corpus", str(HEADLINES)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    model_dir = tmp_path / "m"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "qwen2" and cfg.hidden_size // cfg.num_attention_heads == 64
    assert cfg.vocab_size >= len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") == (eos[0] if isinstance(eos, list) else eos)
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"):
        assert len(tok(token)["input_ids"]) == 1, token

    row = {"title": "冰壶世界杯中国队夺冠"}
    answer = format_answer("关键词是冰壶。", "体育")
    convo = [*news_task.messages(row), {"role": "assistant", "content": answer}]
    text = tok.apply_chat_template(convo, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{news_task.system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n新闻分类:冰壶世界杯中国队夺冠<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
    )
    # without a system turn, the template supplies the task's system prompt, as in training
    no_system = tok.apply_chat_template(convo[1:2], tokenize=False, add_generation_prompt=True)
    assert no_system == text.split("<|im_start|>assistant")[0] + "<|im_start|>assistant\n"
    # think tags survive decoding with skip_special_tokens (what servers do)
    ids = tok(answer)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == answer
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [
        "Qwen2ForCausalLM"
    ]


def test_tiny_model_cli_reports_missing_corpus(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    missing = tmp_path / "nope.jsonl"
    args = ["tiny-model", "--task", str(NEWS_TASK), "--out", str(tmp_path / "m")]
    result = CliRunner().invoke(app, [*args, "--corpus", str(missing)])
    assert result.exit_code == 2 and f"{missing}: corpus file not found" in result.output
