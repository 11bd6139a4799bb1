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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.generate.run import Decision, Runner


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


def _usage_totals(runner: Runner) -> tuple[dict[str, int], float | None]:
    totals = Counter()
    prices = {t.name: t.price_per_million for t in runner.opts.teachers.teachers}
    cost, priced = 0.0, False
    for st in _mine(runner):
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


def _mine(runner: Runner) -> list:
    """Ledger rows that belong to this run's inputs and settings (a ledger may hold more)."""
    return [runner.stored[k] for keys in runner.keys.values() for k in keys if k in runner.stored]


def build_stats(runner: Runner, decisions: list[Decision], elapsed: float) -> dict[str, Any]:
    """The whole ``stats.json`` document."""
    train = [d for d in decisions if d.row.split == "train"]
    test = [d for d in decisions if d.row.split == "test"]
    accepted = [d for d in train if d.status == "accepted"]
    reasons = Counter(d.outcome.reason for d in train if d.status == "rejected" and d.outcome)
    responses = Counter(o.reason for d in decisions for _, _, o in d.rejects)
    reasoning = [d.outcome.reasoning or "" for d in accepted if d.outcome]
    answered = [d for d in test if d.outcome and d.outcome.label]
    correct = sum(d.outcome.label == d.row.gold for d in answered if d.outcome)
    tokens, cost = _usage_totals(runner)
    p = runner.progress
    stats: dict[str, Any] = {
        "task": runner.task.name,
        "teacher_model": runner.model,
        "params": runner.opts.params,
        "samples": runner.opts.samples,
        "require_gold_match": runner.opts.require_gold_match,
        "inputs": {
            "rows": len(runner.rows),
            "duplicates_dropped": runner.duplicates,
            "train": len(train),
            "test": len(test),
            # "input": every row named its split (--test-ratio and --seed unused)
            "split": "input" if runner.rows and runner.rows[0].fixed_split else "seeded",
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
        "reasoning_tokens": (
            percentiles(runner.count_tokens(reasoning)) if runner.count_tokens else None
        ),
        "requests": {
            "answered": sum(st.ok for st in _mine(runner)),
            "failed": sum(not st.ok for st in _mine(runner)),
            "ledger_rows": len(runner.stored),
        },
        "tokens": tokens,
        "cost": cost,
        "run": {
            "requests_sent": p.sent,
            "reused_from_ledger": p.reused,
            "retries": sum(p.retries.values()),
            "retries_by_reason": dict(sorted(p.retries.items())),
            "tokens": p.tokens,
            "stopped": p.stopped,
            "endpoints": {
                ep.name: {
                    "attempts": ep.attempts,
                    "throttled_429": ep.throttled,
                    "concurrency_limit_at_end": int(ep.limit),
                }
                for ep in (runner.pool.endpoints if runner.pool else [])
            },
            "elapsed_s": round(elapsed, 2),
        },
    }
    return stats
