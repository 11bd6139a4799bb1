"""``stats.json``: what a generate run produced, what it cost, and how the teacher did.

Everything outside the ``run`` section is computed from the ledger and the inputs only, so a
resumed run reports the same figures as an uninterrupted one; ``run`` describes this
invocation (requests sent, retries, elapsed time).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.generate.ledger import Stored
from pipeline.generate.runner import Decision
from pipeline.generate.state import RunState
from pipeline.generate.teachers import Price


def percentiles(values: list[int]) -> dict[str, float] | None:
    """Nearest-rank p10/p50/p90/p99 plus min, max and mean; ``None`` for no values."""
    if not values:
        return None
    data = sorted(values)

    def rank(q: float) -> int:
        return data[max(0, math.ceil(q / 100 * len(data)) - 1)]

    return {
        "min": data[0],
        "p10": rank(10),
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "max": data[-1],
        "mean": round(sum(data) / len(data), 1),
    }


class TokenizerError(ValueError):
    """The ``--tokenizer`` folder cannot be loaded."""


def token_counter(tokenizer_dir: Path) -> Callable[[list[str]], list[int]]:
    """A function giving the token counts of texts, with the tokenizer in ``tokenizer_dir``.

    Loaded before any request is sent, so a bad folder fails fast. A ``tokenizer.json`` is
    read with the light ``tokenizers`` library; anything else goes through
    ``transformers.AutoTokenizer`` (imported only here).
    """
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise TokenizerError(f"--tokenizer {path}: expected a folder with a tokenizer in it")
    try:
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            return lambda texts: [
                len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)
            ]
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path))
    except ImportError as e:
        raise TokenizerError(f"--tokenizer {path}: needs the '{e.name}' package") from None
    except Exception as e:  # the libraries raise many kinds for a bad folder
        raise TokenizerError(f"--tokenizer {path}: cannot load a tokenizer ({e})") from None
    return lambda texts: [len(hf(t, add_special_tokens=False)["input_ids"]) for t in texts]


def _usage_totals(
    answers: list[Stored], prices: dict[str, Price | None]
) -> tuple[dict[str, int], float | None]:
    totals = Counter()
    cost, priced = 0.0, False
    for st in answers:
        usage = st.response.get("usage")
        if not st.ok or not usage:
            continue
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        totals["prompt"] += prompt
        totals["completion"] += completion
        if "reasoning_tokens" in usage:
            totals["reasoning"] += usage["reasoning_tokens"]
            totals["answer"] += completion - usage["reasoning_tokens"]
        else:
            totals["without_reasoning_breakdown"] += 1
        price = prices.get(st.endpoint or "")
        if price is not None:
            priced = True
            cost += (prompt * price.input + completion * price.output) / 1e6
    totals["total"] = totals["prompt"] + totals["completion"]
    keys = ["prompt", "completion", "reasoning", "answer", "total", "without_reasoning_breakdown"]
    return {k: totals[k] for k in keys}, (round(cost, 6) if priced else None)


def run_section(state: RunState, elapsed: float) -> dict[str, Any]:
    """``stats.json``'s ``run`` section: what this invocation did."""
    return {
        "requests_sent": state.sent,
        "reused_from_ledger": state.reused,
        "retries": sum(state.retries.values()),
        "retries_by_reason": dict(sorted(state.retries.items())),
        "tokens": state.tokens,
        "stopped": state.stopped,
        "endpoints": {
            name: {
                "attempts": tally.attempts,
                "throttled_429": tally.throttled,
                "concurrency_limit_at_end": tally.limit,
            }
            for name, tally in state.endpoints.items()
        },
        "elapsed_s": round(elapsed, 2),
    }


def build_stats(
    decisions: list[Decision],
    answers: list[Stored],
    state: RunState,
    *,
    header: dict[str, Any],
    duplicates: int,
    ledger_rows: int,
    prices: dict[str, Price | None],
    count_tokens: Callable[[list[str]], list[int]] | None,
    elapsed: float,
) -> dict[str, Any]:
    """The whole ``stats.json`` document.

    ``decisions``: every row's verdict, in input order; ``answers``: the ledger rows of this
    run's requests; ``header``: the run's settings, written first as they are;
    ``prices``: each endpoint's price per million tokens, if it has one.
    """
    train = [d for d in decisions if d.row.split == "train"]
    test = [d for d in decisions if d.row.split == "test"]
    accepted = [d for d in train if d.status == "accepted"]
    reasons = Counter(d.outcome.reason for d in train if d.status == "rejected" and d.outcome)
    responses = Counter(o.reason for d in decisions for _, _, o in d.rejects)
    reasoning = [d.outcome.reasoning or "" for d in accepted if d.outcome]
    answered = [d for d in test if d.outcome and d.outcome.label]
    correct = sum(d.outcome.label == d.row.gold for d in answered if d.outcome)
    tokens, cost = _usage_totals(answers, prices)
    return {
        **header,
        "inputs": {
            "rows": len(decisions),
            "duplicates_dropped": duplicates,
            "train": len(train),
            "test": len(test),
            # "input": every row named its split (--test-ratio and --seed unused)
            "split": "input" if decisions and decisions[0].row.fixed_split else "seeded",
        },
        "complete": all(d.status != "pending" for d in decisions),
        "accepted": len(accepted),
        "rejected": sum(d.status == "rejected" for d in train),
        "pending": sum(d.status == "pending" for d in decisions),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "rejected_responses_by_reason": dict(sorted(responses.items())),
        "label_distribution": dict(sorted(Counter(d.outcome.label for d in accepted).items())),
        "test_label_distribution": dict(sorted(Counter(d.row.gold or "" for d in test).items())),
        "teacher_on_test": {
            "rows": len(test),
            "answered": len(answered),
            "accuracy": round(correct / len(test), 4) if test else None,
        },
        "reasoning_chars": percentiles([len(r) for r in reasoning]),
        "reasoning_tokens": percentiles(count_tokens(reasoning)) if count_tokens else None,
        "requests": {
            "answered": sum(st.ok for st in answers),
            "failed": sum(not st.ok for st in answers),
            "ledger_rows": ledger_rows,
        },
        "tokens": tokens,
        "cost": cost,
        "run": run_section(state, elapsed),
    }
