"""What ``distill generate`` hands to a trainer and what it asks teachers, as users rely on:
readable files, a ledger that stays private, a LLaMA-Factory config whose cutoff covers the
data, per-teacher request options (and their place in the ledger key), and re-runs that need
no teacher key once the ledger answers everything."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import unicodedata
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.generate.command import generate
from pipeline.generate.ledger import request_key
from pipeline.generate.teachers import TeacherConfigError, TeachersConfig, load_teachers
from pipeline.generate.writers import dataset_info
from pipeline.standin.faults import request_key as standin_key
from tests.conftest import HEADLINES, NEWS_TASK, ROOT, sample_input

app = typer.Typer()
app.command()(generate)
PARAMS = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}
DATA = ["train.json", "test.json", "train.sharegpt.jsonl", "dataset_info.json",
        "rejects.jsonl", "stats.json", "llamafactory_sft.yaml"]  # fmt: skip


def run(out: Path, inp: Path, *teacher: str, env: dict | None = None):
    args = ["--task", str(NEWS_TASK), "--input", str(inp), "--out", str(out), "--quiet"]
    return CliRunner().invoke(app, [*args, "--retry-base", "0.01", *teacher], env=env)


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text("utf-8"))


def tokenizer_dir(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(
        HEADLINES.read_text("utf-8").splitlines(),
        trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]),
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    return tmp_path / "tok"


# ---- files and permissions ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_files_honour_the_umask_and_the_ledger_stays_private(standin, tmp_path, umask):
    """A trainer running as another user (LLaMA-Factory, the train container) can read the
    data; the paid-for answers in the ledger stay 0600 whatever the umask."""
    srv = standin()
    old = os.umask(umask)
    try:
        res = run(tmp_path / "out", sample_input(tmp_path, 8), "--teacher-url", srv.base_url,
                  "--teacher-model", srv.model)  # fmt: skip
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    for name in DATA:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    ledger_files = [p for p in out.iterdir() if p.name.startswith("ledger.sqlite")]
    assert ledger_files and {stat.S_IMODE(p.stat().st_mode) for p in ledger_files} == {0o600}


# ---- dataset_info.json ---------------------------------------------------------------------


def test_dataset_info_offers_a_bare_variant_and_names_the_held_out_split():
    info = dataset_info("news")
    train, bare = info["news_train"], info["news_train_bare"]
    assert bare["file_name"] == train["file_name"] == "train.json"
    assert train["columns"]["system"] == "system"
    assert "system" not in bare["columns"]  # LLaMA-Factory then uses the template's default
    assert {k: v for k, v in train["columns"].items() if k != "system"} == bare["columns"]
    held_out = [name for name, e in info.items() if e["file_name"] == "test.json"]
    assert held_out == ["news_test_eval_only"]


# ---- lengths and the LLaMA-Factory config --------------------------------------------------


@pytest.mark.slow
def test_llamafactory_config_covers_the_measured_p99_with_the_lessons_settings(standin, tmp_path):
    tok = tokenizer_dir(tmp_path)
    srv = standin()
    out = tmp_path / "out"
    inp = sample_input(tmp_path, 40)
    res = run(out, inp, "--teacher-url", srv.base_url, "--teacher-model", srv.model,
              "--tokenizer", str(tok), "--test-ratio", "0")  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((out / "llamafactory_sft.yaml").read_text("utf-8"))
    info = json.loads((out / "dataset_info.json").read_text("utf-8"))
    assert Path(cfg["dataset_dir"]) == out.resolve()
    assert cfg["dataset"] in info and not cfg["dataset"].endswith("_eval_only")
    assert cfg["stage"] == "sft" and cfg["finetuning_type"] == "lora"

    # every example measured here in the same tokenizer's tokens: cutoff covers >= 99 %
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    n = lambda s: len(t.encode(s, add_special_tokens=False).ids)  # noqa: E731
    train = json.loads((out / "train.json").read_text("utf-8"))
    lengths = [n(r["system"]) + n(r["instruction"]) + n(r["output"]) for r in train]
    covered = sum(x <= cfg["cutoff_len"] for x in lengths) / len(lengths)
    assert len(train) >= 30 and covered >= 0.99
    assert cfg["cutoff_len"] > 2048 or max(lengths) <= 2048  # not LLaMA-Factory's default
    s = stats(out)["lengths"]
    assert s["unit"] == "tokens" and s["cutoff_len"] == cfg["cutoff_len"]
    assert s["warning"] is None and s["suggested_max_model_len"] >= s["sequence"]["p99"]

    # the lesson's hyper-parameters, as the project's own LoRA config has them
    ours = yaml.safe_load((ROOT / "configs/train/qwen2.5-7b-lora.yaml").read_text("utf-8"))
    assert cfg["model_name_or_path"] == ours["base_model"]
    assert (cfg["lora_rank"], cfg["lora_alpha"]) == (ours["lora"]["r"], ours["lora"]["alpha"])
    assert cfg["lora_dropout"] == ours["lora"]["dropout"]
    assert float(cfg["learning_rate"]) == ours["learning_rate"]
    assert cfg["num_train_epochs"] == ours["epochs"]
    assert cfg["lr_scheduler_type"] == ours["lr_scheduler"]
    assert cfg["warmup_ratio"] == ours["warmup_ratio"]
    assert cfg["per_device_train_batch_size"] == ours["per_device_batch_size"]
    assert cfg["gradient_accumulation_steps"] == ours["gradient_accumulation_steps"]

    # a cutoff the user set that cuts examples: said in stats.json and on the console
    cut = sorted(lengths)[len(lengths) // 2]
    res = run(out, inp, "--teacher-url", srv.base_url, "--teacher-model", srv.model,
              "--tokenizer", str(tok), "--test-ratio", "0", "--cutoff-len", str(cut))  # fmt: skip
    assert res.exit_code == 0, res.output
    s = stats(out)["lengths"]
    longer = s["over_cutoff"]
    assert longer >= sum(x > cut for x in lengths) > 0  # template tokens only add to each
    assert s["warning"] and f"--cutoff-len {cut}" in s["warning"]
    assert f"warning: {longer} of {len(train)} training examples" in res.output
    assert yaml.safe_load((out / "llamafactory_sft.yaml").read_text("utf-8"))["cutoff_len"] == cut


# ---- teachers: request options and the ledger key ------------------------------------------


def _documented_key(messages, model, params, sample) -> str:
    """The ledger key as ledgers written before request options existed computed it."""
    norm = [
        {"role": m["role"], "content": unicodedata.normalize("NFC", m["content"]).strip()}
        for m in messages
    ]
    blob = {"messages": norm, "model": model, "params": params, "sample": sample}
    text = json.dumps(blob, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_ledger_key_is_unchanged_for_teachers_without_options_and_covers_options():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "新闻分类:x"}]
    plain = TeachersConfig(teachers=[{"base_url": "http://a/v1", "model": "m"}])
    assert plain.key_options is None
    assert request_key(msgs, "m", PARAMS, 0, plain.key_options) == _documented_key(
        msgs, "m", PARAMS, 0
    )
    think = {"extra_body": {"thinking": {"type": "enabled"}}, "reasoning_effort": "high"}
    opt = TeachersConfig(teachers=[{"base_url": "http://a/v1", "model": "m", **think}])
    other = TeachersConfig(
        teachers=[{"base_url": "http://a/v1", "model": "m", "reasoning_effort": "max"}]
    )
    keys = {request_key(msgs, "m", PARAMS, 0, c.key_options) for c in (plain, opt, other)}
    assert len(keys) == 3
    # endpoints that spell the same switch differently can be declared equivalent
    both = TeachersConfig(
        teachers=[
            {"base_url": "http://a/v1", "model": "m", **think},
            {"base_url": "http://b/v1", "model": "m", "extra_body": {"enable_thinking": True}},
        ],
        ledger_options={"thinking": "on"},
    )
    assert both.key_options == {"thinking": "on"}


def test_extra_body_cannot_override_what_generate_sets(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(
        "teachers:\n  - base_url: http://x/v1\n    model: m\n"
        "    extra_body: {temperature: 0, enable_thinking: true}\n"
    )
    with pytest.raises(TeacherConfigError, match=r"teachers\.0\.extra_body.*'temperature'"):
        load_teachers(path)


def test_example_teachers_file_shows_each_providers_options():
    cfg = load_teachers(ROOT / "configs" / "teachers.example.yaml")
    opts = [t.request_options() for t in cfg.teachers]
    assert {"thinking": {"type": "enabled"}} in [
        {k: v for k, v in o.items() if k == "thinking"} for o in opts
    ]
    assert any("enable_thinking" in o and "thinking_budget" in o for o in opts)
    text = (ROOT / "configs" / "teachers.example.yaml").read_text("utf-8")
    assert "chat_template_kwargs" in text  # the local vLLM example (commented out)


@pytest.mark.slow
def test_teacher_options_reach_the_teacher_and_key_the_ledger(standin, tmp_path):
    srv = standin()
    inp = sample_input(tmp_path, 6)
    out = tmp_path / "out"
    res = run(out, inp, "--teacher-url", srv.base_url, "--teacher-model", srv.model)
    assert res.exit_code == 0, res.output
    first = len(srv.requests())
    assert first == 6

    def teachers(extra: str) -> Path:
        path = tmp_path / f"t{len(extra)}.yaml"
        path.write_text(
            f"teachers:\n  - name: t\n    base_url: {srv.base_url}\n    model: {srv.model}\n"
            + extra
        )
        return path

    # the same teacher from a teachers file, no options: the existing ledger answers all
    res = run(out, inp, "--teachers", str(teachers("")))
    assert res.exit_code == 0, res.output
    assert len(srv.requests()) == first and stats(out)["run"]["reused_from_ledger"] == 6

    # with options: new answers, and the options travel in each request body
    opts = "    extra_body: {thinking: {type: enabled}}\n    reasoning_effort: high\n"
    res = run(out, inp, "--teachers", str(teachers(opts)))
    assert res.exit_code == 0, res.output
    log = srv.requests()[first:]
    assert len(log) == 6 and stats(out)["run"]["requests_sent"] == 6
    from distill_common.task import load_task
    from pipeline.generate.inputs import read_inputs

    rows = read_inputs(inp, load_task(NEWS_TASK)).rows
    sent = {
        standin_key({"model": srv.model, "messages": r.messages, "seed": 0, **PARAMS,
                     "thinking": {"type": "enabled"}, "reasoning_effort": "high"})
        for r in rows
    }  # fmt: skip
    assert {e["key"] for e in log} == sent


@pytest.mark.slow
def test_a_rerun_the_ledger_answers_needs_no_teacher_key(standin, tmp_path):
    srv = standin()
    inp = sample_input(tmp_path, 5)
    out = tmp_path / "out"
    teacher = ["--teacher-url", srv.base_url, "--teacher-model", srv.model,
               "--api-key-env", "TEACHER_KEY"]  # fmt: skip
    res = run(out, inp, *teacher, env={"TEACHER_KEY": "sk-test"})
    assert res.exit_code == 0, res.output
    before = (out / "train.json").read_bytes()
    srv.stop()  # nothing to reach either
    env = {k: v for k, v in os.environ.items() if k != "TEACHER_KEY"}
    res = CliRunner().invoke(
        app,
        ["--task", str(NEWS_TASK), "--input", str(inp), "--out", str(out), "--quiet", *teacher],
        env={**env, "TEACHER_KEY": ""},
    )
    assert res.exit_code == 0, res.output
    assert (out / "train.json").read_bytes() == before
    assert stats(out)["run"]["requests_sent"] == 0
    # a run that does need the teacher still says which variable is missing
    res = run(tmp_path / "fresh", inp, *teacher, env={"TEACHER_KEY": ""})
    assert res.exit_code == 2 and "TEACHER_KEY is not set" in res.output
