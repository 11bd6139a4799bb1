"""The loss-mask preflight, the cutoff and the dataset reader (no training compute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.train.config import load_config
from pipeline.train.data import DataError, load_dataset, shape_prompts
from pipeline.train.preflight import (
    IGNORE,
    PreflightError,
    encode,
    percentile_cutoff,
    run_preflight,
    truncate,
)
from tests.fixtures_vllm import ROOT, news_rows, write_alpaca

TINY_CONFIG = ROOT / "configs" / "train" / "tiny-cpu.yaml"

# Real-world ways a template breaks answer-only training.
STRIPS_REASONING = (  # DeepSeek-R1-distill style: history turns lose their <think> section
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' -%}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}<|im_end|>\n{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
NO_END_OF_TURN = (  # the assistant turn is never closed, so the model never learns to stop
    "{%- for m in messages -%}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{%- if m['role'] != 'assistant' -%}<|im_end|>\n{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def dataset(news_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    write_alpaca(news_task, news_rows()[:24], out)
    return load_dataset(out)


def _encode_all(tokenizer, examples):
    return [encode(tokenizer, ex) for ex in examples]


def test_serving_template_trains_answer_and_end_of_turn(tokenizer, dataset):
    encoded = _encode_all(tokenizer, dataset.examples)
    run_preflight(tokenizer, dataset.examples, encoded, encoded, show=0)
    enc = encoded[0]
    trained = [t for t in enc.labels if t != IGNORE]
    text = tokenizer.decode(trained, skip_special_tokens=False)
    assert text.startswith(dataset.examples[0].answer)  # the whole answer, from its first token
    assert text.rstrip("\n").endswith("<|im_end|>")
    # the prompt (system + user + assistant header) carries no loss
    first = enc.labels.index(trained[0])
    prompt = tokenizer.decode(enc.input_ids[:first], skip_special_tokens=False)
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("template", "expected"),
    [(STRIPS_REASONING, "answer is not"), (NO_END_OF_TURN, "end-of-turn token")],
)
def test_preflight_rejects_broken_template(tokenizer, dataset, template, expected):
    from transformers import AutoTokenizer

    broken = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    broken.chat_template = template
    encoded = _encode_all(broken, dataset.examples)
    with pytest.raises(PreflightError, match=expected) as err:
        run_preflight(broken, dataset.examples, encoded, encoded, show=0)
    assert str(dataset.path) in str(err.value)  # names the example's file:line


def test_preflight_rejects_example_truncated_to_nothing(tokenizer, dataset):
    encoded = _encode_all(tokenizer, dataset.examples)
    prompt_len = min(e.labels.count(IGNORE) for e in encoded)
    cut = [truncate(e, prompt_len) for e in encoded]
    with pytest.raises(PreflightError, match="no trained token left after truncation"):
        run_preflight(tokenizer, dataset.examples, encoded, cut, show=0)


def test_cutoff_covers_99th_percentile(tokenizer, tmp_path, news_task):
    from pipeline.train.sft import prepare

    write_alpaca(news_task, news_rows()[:200], tmp_path)
    config = load_config(TINY_CONFIG)
    assert config.cutoff_len is None
    _, encoded, cutoff, info = prepare(config, tmp_path, tokenizer)
    examples = shape_prompts(load_dataset(tmp_path).examples, config.system_prompt, config.seed)
    lengths = sorted(len(encode(tokenizer, ex).input_ids) for ex in examples)
    assert cutoff == percentile_cutoff(lengths, 99)
    assert sum(n > cutoff for n in lengths) <= 2  # at most 1 % of 200 lose their tail
    assert sum(n <= cutoff for n in lengths) >= 198
    assert max(len(e.input_ids) for e in encoded) == cutoff
    assert info["cutoff_len"] == cutoff and "99" in info["cutoff_reason"]


def test_percentile_cutoff():
    assert percentile_cutoff(list(range(1, 101)), 99) == 99
    assert percentile_cutoff([5], 99) == 5
    assert percentile_cutoff([3, 1, 2], 100) == 3


def test_reads_generate_output_and_llamafactory_registry(tmp_path, news_task):
    write_alpaca(news_task, news_rows()[:3], tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.path == tmp_path / "train.json"
    first = ds.examples[0]
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt == news_task.messages(news_rows()[0])
    assert first.answer.startswith("<think>\n")
    # the same rows as messages (our train.sharegpt.jsonl shape), without a registry
    lines = [
        json.dumps({"messages": [*ex.prompt, {"role": "assistant", "content": ex.answer}]})
        for ex in ds.examples
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    assert load_dataset(tmp_path / "m.jsonl").examples[1].prompt == ds.examples[1].prompt


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.json", "[]", r"empty.json: the dataset has no examples"),
        ("empty.jsonl", "\n\n", r"empty.jsonl: the dataset has no examples"),
        (
            "bad.jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": ',
            r"bad.jsonl:2: not valid JSON",
        ),
        (
            "missing.json",
            '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c"}\n]',
            r"missing.json:3: missing field 'output'",
        ),
        ("blank.json", '[{"instruction": "a", "output": "  "}]', r"blank.json:1: empty answer"),
        ("notlist.json", '{"a": 1}', r"notlist.json:1: expected a JSON list"),
    ],
)
def test_bad_dataset_errors_name_file_and_line(tmp_path: Path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(path)


def test_missing_data_dir_is_clear(tmp_path):
    with pytest.raises(DataError, match=r"no dataset_info\.json, train\.json"):
        load_dataset(tmp_path)


def test_cli_train_reports_bad_data_without_traceback(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    bad = tmp_path / "train.json"
    bad.write_text(
        '[\n {"instruction": "新闻分类:x", "output": "<think>\\nr\\n</think>\\n\\n体育"},\n 7\n]'
    )
    result = CliRunner().invoke(
        app,
        [
            *("train", "--config", str(TINY_CONFIG), "--base", str(tiny_base)),
            *("--data", str(bad), "--out", str(tmp_path / "a")),
        ],
        catch_exceptions=False,
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2
    assert f"{bad}:3: expected an object per row" in result.output
    assert "Traceback" not in result.output


def _prompt_ids(enc) -> list[int]:
    """The masked prefix of an encoded example: what the model reads before its answer."""
    return enc.input_ids[: next(i for i, lb in enumerate(enc.labels) if lb != IGNORE)]


@pytest.mark.parametrize("mode", ["keep", "drop", "mix"])
def test_system_prompt_choice_is_what_gets_trained(tokenizer, tmp_path, news_task, mode):
    from pipeline.train.sft import prepare
    from pipeline.train.tiny import DEFAULT_SYSTEM

    rows = news_rows()[:40]
    write_alpaca(news_task, rows, tmp_path)
    config = load_config(TINY_CONFIG).model_copy(update={"system_prompt": mode})
    _, encoded, _, info = prepare(config, tmp_path, tokenizer)
    bare = 0
    for row, enc in zip(rows, encoded, strict=True):
        prompt = tokenizer.decode(_prompt_ids(enc), skip_special_tokens=False)
        system, user = news_task.messages(row)
        if news_task.system_prompt in prompt:
            asked = [system, user]
        else:  # trained as a client asks without a system prompt: the template's default line
            bare += 1
            assert DEFAULT_SYSTEM in prompt
            asked = [user]
        # token for token what the chat template renders for that request
        assert _prompt_ids(enc) == list(
            tokenizer.apply_chat_template(asked, add_generation_prompt=True, return_dict=True)[
                "input_ids"
            ]
        )
    assert bare == {"keep": 0, "drop": 40, "mix": 20}[mode]  # mix: a seeded half
    assert info["system_prompt"] == mode and info["examples_with_system"] == 40 - bare


def test_mix_is_seeded_and_shows_both_shapes(tokenizer, dataset):
    from rich.console import Console

    mixed = shape_prompts(dataset.examples, "mix", seed=42)
    assert shape_prompts(dataset.examples, "mix", seed=42) == mixed
    assert shape_prompts(dataset.examples, "mix", seed=7) != mixed
    assert sum(ex.has_system for ex in mixed) == len(dataset.examples) // 2
    assert [ex.answer for ex in mixed] == [ex.answer for ex in dataset.examples]
    console = Console(record=True, width=120)
    encoded = _encode_all(tokenizer, mixed)
    run_preflight(tokenizer, mixed, encoded, encoded, show=2, console=console)
    shown = console.export_text()
    assert "(system + user)" in shown and "(user only)" in shown


def test_bad_system_prompt_choice_is_named(tmp_path, tiny_base):
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.train.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(TINY_CONFIG.read_text() + "system_prompt: sometimes\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*system_prompt"):
        load_config(path)
    result = CliRunner().invoke(
        app,
        [
            *("train", "--config", str(TINY_CONFIG), "--base", str(tiny_base)),
            *("--data", str(tmp_path), "--out", str(tmp_path / "a")),
            *("--system-prompt", "sometimes"),
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2 and "sometimes" in result.output
