"""How long the training examples are, and a ready LLaMA-Factory config whose ``cutoff_len``
covers them.

LLaMA-Factory cuts every example at ``cutoff_len`` (2048 by default) without a word, and real
R1 answers run to thousands of tokens. With ``--tokenizer`` the lengths are counted in the
student's tokens; without one they are estimated in characters, which for Chinese and English
text is more than Qwen-family tokenizers use, so the estimate errs long.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.generate.stats import percentiles

# Tokens a ChatML template adds around three messages (role markers, end tokens, newlines),
# and room for a template's own default system line when an example carries none (Qwen2.5's
# is about 20 tokens).
TEMPLATE_TOKENS = 16
DEFAULT_SYSTEM_TOKENS = 32
ROUND_TO = 128  # cutoff_len is rounded up to a multiple of this
SERVE_MARGIN = 1.25  # suggested vLLM max_model_len: this much over the p99 sequence

# The lesson trains Qwen2.5-7B-Instruct with LLaMA-Factory's LoRA SFT; the values are the ones
# configs/train/qwen2.5-7b-lora.yaml uses (tests/test_generate_handoff.py keeps them equal).
LORA_SFT = {
    "model_name_or_path": "Qwen/Qwen2.5-7B-Instruct",
    "template": "qwen",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "learning_rate": 1.0e-4,
    "num_train_epochs": 3.0,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "seed": 42,
}


def _round_up(n: float, step: int) -> int:
    return max(step, math.ceil(n / step) * step)


def measure(
    train: list[dict[str, Any]],
    count_tokens: Callable[[list[str]], list[int]] | None,
    *,
    cutoff_len: int | None = None,
) -> dict[str, Any]:
    """The ``lengths`` section of ``stats.json`` for the accepted training rows.

    ``sequence`` is system prompt + user message + answer + template tokens (the longer of
    the two shapes dataset_info.json offers); ``cutoff_len`` is the user's, or the p99
    sequence rounded up; ``over_cutoff`` counts the examples LLaMA-Factory would cut.
    """
    unit = "tokens" if count_tokens else "chars_estimate"
    if count_tokens:
        system = count_tokens([r["system"] for r in train])
        user = count_tokens([r["instruction"] for r in train])
        answer = count_tokens([r["output"] for r in train])
    else:
        system = [len(r["system"]) for r in train]
        user = [len(r["instruction"]) for r in train]
        answer = [len(r["output"]) for r in train]
    sequence = [
        max(s, DEFAULT_SYSTEM_TOKENS) + u + a + TEMPLATE_TOKENS
        for s, u, a in zip(system, user, answer, strict=True)
    ]
    seq = percentiles(sequence)
    p99 = seq["p99"] if seq else 0
    chosen = cutoff_len or _round_up(p99, ROUND_TO)
    over = sum(n > chosen for n in sequence)
    out: dict[str, Any] = {
        "unit": unit,
        "answer": percentiles(answer),
        "sequence": seq,
        "cutoff_len": chosen,
        "cutoff_from": "--cutoff-len" if cutoff_len else "p99",
        "over_cutoff": over,
        "suggested_max_model_len": _round_up(p99 * SERVE_MARGIN, 256) if seq else None,
        "warning": None,
    }
    if cutoff_len and over:
        how = "tokens" if count_tokens else "characters (estimated: pass --tokenizer to count)"
        out["warning"] = (
            f"{over} of {len(sequence)} training examples are longer than --cutoff-len "
            f"{cutoff_len} {how} (longest {seq['max'] if seq else 0}); LLaMA-Factory cuts them "
            "without a word: raise cutoff_len in the training config or drop them"
        )
    return out


def llamafactory_yaml(task_name: str, data_dir: Path, lengths: dict[str, Any]) -> str:
    """A LLaMA-Factory training config for the data in ``data_dir`` (``llamafactory-cli train
    FILE``), with the lesson's LoRA settings and a ``cutoff_len`` that covers the data."""
    h = LORA_SFT
    unit = lengths["unit"]
    seq = lengths["sequence"] or {}
    measured = (
        f"p99 {seq.get('p99')} / max {seq.get('max')} {unit.replace('_', ' ')}"
        if seq
        else "no accepted examples yet"
    )
    return f"""\
# LoRA SFT with LLaMA-Factory on the data in this folder (written by `distill generate`):
#   llamafactory-cli train {data_dir / "llamafactory_sft.yaml"}
# Which dataset: {task_name}_train_bare (the default here) trains on what a bare client request
# renders to: no system message, so the chat template's own default system line, then the user
# message. That is what Open WebUI, the openai SDK example in the README and most clients send.
# {task_name}_train keeps the task's long system prompt: pick it only if every client sends that
# prompt (or the gateway adds it: GATEWAY_INJECT_SYSTEM_PROMPT). {task_name}_test_eval_only is
# the held-out split: evaluate on it, never train on it.
# cutoff_len covers the examples' measured length ({measured}; from: {lengths["cutoff_from"]}).
# If you move this folder, change dataset_dir.

### model
model_name_or_path: {h["model_name_or_path"]}
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_target: all
lora_rank: {h["lora_rank"]}
lora_alpha: {h["lora_alpha"]}
lora_dropout: {h["lora_dropout"]}

### dataset
dataset_dir: {data_dir}
dataset: {task_name}_train_bare
template: {h["template"]}
cutoff_len: {lengths["cutoff_len"]}
overwrite_cache: true
preprocessing_num_workers: 8

### output
output_dir: saves/{task_name}-lora-sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: {h["per_device_train_batch_size"]}
gradient_accumulation_steps: {h["gradient_accumulation_steps"]}
learning_rate: {h["learning_rate"]:.1e}
num_train_epochs: {h["num_train_epochs"]}
lr_scheduler_type: {h["lr_scheduler_type"]}
warmup_ratio: {h["warmup_ratio"]}
bf16: true
seed: {h["seed"]}
ddp_timeout: 180000000
"""
