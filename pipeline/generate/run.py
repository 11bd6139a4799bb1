"""Orchestrate a generate run: inputs -> teacher (via ledger) -> normaliser -> output files.

Sending happens in this process (:mod:`pipeline.generate.runner`) or over worker processes
(:mod:`pipeline.generate.workers`); either way every answer is committed to the ledger first,
and every output file is then assembled from the ledger alone, in input order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.generate import lengths
from pipeline.generate.runner import GenerateOptions, Plan, Runner, run_loop, sending_gc
from pipeline.generate.state import progress_bar
from pipeline.generate.stats import build_stats, token_counter
from pipeline.generate.workers import plan_workers, run_in_workers
from pipeline.generate.writers import alpaca_record, sharegpt_record, write_outputs

__all__ = ["GenerateOptions", "run_generate", "send_requests", "write"]


def send_requests(runner: Runner) -> None:
    """Ask the teacher for what the ledger lacks: in this process, or over worker processes."""
    pending = sum(d.status == "pending" for d in runner.decisions())
    n = plan_workers(runner.opts, pending)
    if n > 1:
        run_in_workers(runner, n)
        return
    with (
        progress_bar(runner.state.total, runner.snapshot, show=not runner.opts.quiet),
        sending_gc(),
    ):
        run_loop(runner.run_async())


def write(
    runner: Runner, elapsed: float, count_tokens: Callable[[list[str]], list[int]] | None = None
) -> dict[str, Any]:
    """Assemble every output from the ledger, in input order, and write it atomically."""
    decisions = runner.decisions()
    train, test, sharegpt, rejects = [], [], [], []
    for d in decisions:
        row = d.row
        for sample, st, outcome in d.rejects:
            rejects.append(
                {
                    "id": row.id,
                    "split": row.split,
                    "sample": sample,
                    "reason": outcome.reason,
                    "detail": outcome.detail,
                    "row": row.record,
                    "raw": st.response,
                }
            )
        text = d.outcome.text if d.status == "accepted" and d.outcome else None
        if row.split == "test":
            label = d.outcome.label if d.outcome else None
            test.append(
                alpaca_record(row.id, row.messages, text or "", row.gold, teacher_label=label)
            )
        elif text is not None:
            assert d.outcome is not None and d.outcome.label is not None
            train.append(alpaca_record(row.id, row.messages, text, d.outcome.label))
            sharegpt.append(sharegpt_record(row.id, row.messages, text, d.outcome.label))
    opts = runner.opts
    stats = build_stats(
        decisions,
        runner.answers(),
        runner.state,
        header={
            "task": runner.plan.task.name,
            "teacher_model": opts.teachers.key_model,
            "params": opts.params,
            "samples": opts.samples,
            "require_gold_match": opts.require_gold_match,
        },
        duplicates=runner.plan.duplicates,
        ledger_rows=len(runner.stored),
        prices={t.name: t.price_per_million for t in opts.teachers.teachers},
        count_tokens=count_tokens,
        elapsed=elapsed,
    )
    stats["lengths"] = lengths.measure(train, count_tokens, cutoff_len=opts.cutoff_len)
    write_outputs(
        opts.out,
        task_name=runner.plan.task.name,
        train=train,
        test=test,
        sharegpt=sharegpt,
        rejects=rejects,
        stats=stats,
        llamafactory=lengths.llamafactory_yaml(
            runner.plan.task.name, opts.out.resolve(), stats["lengths"]
        ),
    )
    return stats


def run_generate(opts: GenerateOptions) -> dict[str, Any]:
    """Run the stage end to end; returns the stats written to ``stats.json``."""
    start = time.monotonic()
    plan = Plan.load(opts)
    # loaded before any request is sent (or the output folder made): a bad folder fails fast
    count_tokens = token_counter(opts.tokenizer) if opts.tokenizer else None
    runner = Runner(opts, plan)
    try:
        # a re-run the ledger answers completely needs no teacher (nor its key)
        decisions = runner.decisions()
        if any(d.status == "pending" for d in decisions):
            send_requests(runner)
        else:  # every answer read back, counted as the sending path counts them
            runner.state.reused = sum((d.sample or 0) + 1 for d in decisions)
        return write(runner, time.monotonic() - start, count_tokens)
    finally:
        runner.ledger.close()
