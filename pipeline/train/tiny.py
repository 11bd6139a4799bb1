"""A tiny Qwen2-architecture base model for CPU runs (a stand-in for Qwen2.5-7B-Instruct).

Random weights, a byte-level BPE tokenizer trained here on the task's own text, a ChatML chat
template in the Qwen2.5 style and ``<|im_end|>`` as end of turn. Head size 64, because vLLM's
CPU attention kernels reject smaller heads. Nothing downstream knows the model is tiny: it is
an ordinary Hugging Face model directory.

``<think>``/``</think>`` are single tokens but *not* special tokens: servers decode with
``skip_special_tokens=True`` and would otherwise delete them from the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from distill_common.task import Task
from distill_common.think import THINK_CLOSE, THINK_OPEN

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE]
HEAD_NORM = 2.0
HEAD_DIM = 64  # vLLM's CPU attention rejects smaller heads

# The Qwen2.5 layout: a system turn always comes first (the default one when the caller sends
# none), then one ChatML block per message, then the open assistant turn on request.
_CHAT_TEMPLATE = """\
{%- set default_system = DEFAULT_SYSTEM -%}
{%- if messages[0]['role'] == 'system' -%}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if not (loop.first and message['role'] == 'system') -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""


def chat_template(default_system: str) -> str:
    """The ChatML template with ``default_system`` used when a conversation has no system turn."""
    return _CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", json.dumps(default_system, ensure_ascii=False))


def _strings(value: object) -> Iterator[str]:
    """Every string inside a JSON value (dict values, list items), depth first."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def read_corpus(path: Path) -> list[str]:
    """Texts from a corpus file: JSONL (string fields of each row), JSON, or plain text lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.extend(_strings(json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return out
    if path.suffix == ".json":
        try:
            return list(_strings(json.loads(text)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return [line for line in text.splitlines() if line.strip()]


# CJK ideographs (basic block, extension A and compatibility ideographs).
_HAN = re.compile("([\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def split_han(text: str) -> str:
    """``text`` with every CJK character between line breaks, so BPE learns no merges of it
    with a neighbour (the pre-tokeniser never joins a line break to a letter)."""
    return _HAN.sub("\n\\1\n", text)


def task_texts(task: Task, corpus: Iterable[str], prompt_weight: int = 50) -> Iterator[str]:
    """The tokenizer's training text: the task's fixed text (weighted, since every example
    repeats it), its labels and the corpus.

    Merges between CJK characters are learnt from the fixed text only: in the corpus each
    character stays a token of its own, so a word is split the same way in a headline and in
    a reasoning line that quotes it (a byte-level BPE trained on the headlines themselves
    glues keywords to their neighbours, e.g. one token for a whole four-character phrase,
    and a small model cannot then learn to cite the words it reads)."""
    fixed = [task.system_prompt, task.user_template.split("{")[0], *task.labels]
    fixed += ["system\n", "user\n", "assistant\n"]
    for _ in range(prompt_weight):
        yield from fixed
    for text in corpus:
        yield split_han(text)


def build_tokenizer(texts: Iterable[str], vocab_size: int, default_system: str):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers tokenizer."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    # The same normaliser and pre-tokeniser transformers' Qwen2Tokenizer rebuilds on load (it
    # does so for every model of type qwen2), so the merges learnt here are the ones applied.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = chat_template(default_system)
    return wrapped


def build_tiny_model(
    task: Task,
    out: Path,
    corpus_files: list[Path] | None = None,
    vocab_size: int = 4000,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
) -> Path:
    """Write a random-init tiny Qwen2 model with its task tokenizer to ``out``.

    ``hidden_size`` must be a multiple of 64 (the head size)."""
    if hidden_size % HEAD_DIM:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the head size {HEAD_DIM}")
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    corpus = [t for f in corpus_files or [] for t in read_corpus(f)]
    tokenizer = build_tokenizer(task_texts(task, corpus), vocab_size, task.system_prompt)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // HEAD_DIM,
        # one key/value head per query head: with only two heads, sharing one K/V (GQA) left
        # the student too little attention to learn to cite the words it reads
        num_key_value_heads=hidden_size // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Untied output head with rows of norm ~2 (instead of ~0.2): with the default init the
    # logits of a random 128-wide model span only a few units, too flat to learn through LoRA
    # alone (embeddings, head and norms stay frozen in LoRA training). Tied, the larger rows
    # would make the random model echo its input token with near-certainty.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, HEAD_NORM / config.hidden_size**0.5)
    model.generation_config = GenerationConfig(
        bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
