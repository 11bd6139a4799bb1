"""Tokenise examples through the serving chat template and check what carries loss.

The examples checked are the ones trained, in their trained prompt shape (with or without the
system message, see :func:`pipeline.train.data.shape_prompts`). Each example is rendered by the
tokenizer's own chat template twice: the prompt with the generation prompt (exactly what a
server sends the model) and the whole conversation. Tokens past the shared prefix are the
answer and carry loss; everything before is masked (-100). The preflight then checks, before
any compute is spent, that

* the answer (think section + label) is trained,
* the end-of-turn token right after it is trained (otherwise the model never learns to stop),
* no example is left without any trained token after truncation to the cutoff.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.train.data import Example

IGNORE = -100


class PreflightError(RuntimeError):
    """Training would not teach what it should; the message says which example and why."""


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: ids, labels (-100 where masked) and where it came from."""

    input_ids: list[int]
    labels: list[int]
    answer: str
    where: str

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(out["input_ids"])


def encode(tokenizer, example: Example) -> Encoded:
    """Tokenise one example; only tokens after the rendered prompt carry loss."""
    prompt = _ids(tokenizer, example.prompt, add_generation_prompt=True)
    convo = [*example.prompt, {"role": "assistant", "content": example.answer}]
    full = _ids(tokenizer, convo, add_generation_prompt=False)
    shared = 0
    for a, b in zip(prompt, full, strict=False):
        if a != b:
            break
        shared += 1
    labels = [IGNORE] * shared + full[shared:]
    return Encoded(full, labels, example.answer, example.where)


def truncate(enc: Encoded, cutoff: int) -> Encoded:
    """Keep the first ``cutoff`` tokens (the answer's tail is what gets lost)."""
    return Encoded(enc.input_ids[:cutoff], enc.labels[:cutoff], enc.answer, enc.where)


def percentile_cutoff(lengths: Sequence[int], percentile: float) -> int:
    """The smallest length that covers ``percentile`` % of the examples."""
    ordered = sorted(lengths)
    k = max(math.ceil(len(ordered) * percentile / 100) - 1, 0)
    return ordered[min(k, len(ordered) - 1)]


def template_problems(tokenizer, enc: Encoded) -> list[str]:
    """What is wrong with the loss mask of one (untruncated) example; empty when fine."""
    eos_id = tokenizer.eos_token_id
    trained = [t for t in enc.labels if t != IGNORE]
    problems = []
    answer = enc.answer.strip()
    cut = trained.index(eos_id) if eos_id in trained else len(trained)
    before_eos = tokenizer.decode(trained[:cut], skip_special_tokens=False)
    if answer not in tokenizer.decode(trained, skip_special_tokens=False):
        problems.append("the answer is not (entirely) trained")
    elif eos_id not in trained or answer not in before_eos:
        problems.append(
            f"the end-of-turn token {tokenizer.eos_token!r} after the answer is not trained"
        )
    return problems


def render(tokenizer, enc: Encoded):
    """A rich Text of the example: trained tokens highlighted, masked ones dim."""
    from rich.text import Text

    text = Text()
    for tid, label in zip(enc.input_ids, enc.labels, strict=True):
        piece = tokenizer.decode([tid], skip_special_tokens=False)
        text.append(piece, style="bold black on green" if label != IGNORE else "dim")
    return text


def shape_name(example: Example) -> str:
    return "system + user" if example.has_system else "user only"


def showcase(examples: Sequence[Example], show: int) -> list[int]:
    """Indices of ``show`` examples to print: the first of each prompt shape in turn, so a mixed
    set shows both shapes."""
    shapes: dict[bool, list[int]] = {}
    for i, ex in enumerate(examples):
        shapes.setdefault(ex.has_system, []).append(i)
    queues = [iter(v) for v in shapes.values()]
    picked: list[int] = []
    while len(picked) < min(show, len(examples)):
        for q in queues:
            i = next(q, None)
            if i is not None and len(picked) < show:
                picked.append(i)
    return sorted(picked)


def run_preflight(
    tokenizer,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    truncated: Sequence[Encoded],
    show: int = 3,
    console=None,
) -> None:
    """Check the loss mask; print ``show`` examples; raise :class:`PreflightError` on trouble."""
    from rich.panel import Panel

    for i in showcase(examples, show) if console is not None else []:
        ex = examples[i]
        title = (
            f"preflight {ex.where} ({shape_name(ex)}): "
            "[bold black on green]trained[/] / [dim]masked[/]"
        )
        console.print(Panel(render(tokenizer, encoded[i]), title=title, title_align="left"))
    for ex, enc in zip(examples, encoded, strict=True):
        problems = template_problems(tokenizer, enc)
        if problems:
            raise PreflightError(
                f"{ex.where}: {'; '.join(problems)} with this chat template. "
                "Loss must cover the whole answer (think + label) and the end-of-turn token."
            )
    empty = [t.where for t in truncated if t.trained == 0]
    if empty:
        cutoff = max(len(t.input_ids) for t in truncated)
        raise PreflightError(
            f"{len(empty)} example(s) have no trained token left after truncation to "
            f"{cutoff} tokens (first: {empty[0]}); raise cutoff_len or shorten the prompt."
        )
