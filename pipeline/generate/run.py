"""Orchestrate a generate run: inputs -> teacher (via ledger) -> normaliser -> output files.

``--samples K`` keeps the **first sample that passes** (samples are asked one after another
and only until one passes): it is the rejection-sampling rule, it never pays for samples it
does not need, and with ``--require-gold-match`` a majority vote would add nothing.
Held-out (test) rows are asked once (sample 0) without the gold filter, so the teacher's
accuracy can be measured on exactly the split the student is evaluated on.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_common.task import Task, load_task
from pipeline.generate import lengths
from pipeline.generate.client import CallResult, RetryPolicy, TeacherClient, call_with_retries
from pipeline.generate.inputs import InputRow, read_inputs, split_rows
from pipeline.generate.ledger import Ledger, Stored, request_key
from pipeline.generate.normalise import Outcome, normalise
from pipeline.generate.stats import build_stats, token_counter
from pipeline.generate.teachers import EndpointPool, TeachersConfig
from pipeline.generate.writers import alpaca_record, sharegpt_record, write_outputs

LEDGER = "ledger.sqlite"


@dataclass
class GenerateOptions:
    """Everything a run needs; the CLI fills it from flags."""

    task: Path
    input: Path
    out: Path
    teachers: TeachersConfig
    concurrency: int | None = None
    samples: int = 1
    require_gold_match: bool = False
    max_requests: int | None = None
    budget_tokens: int | None = None
    stream: bool = True
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 8192
    timeout: float = 600.0
    test_ratio: float = 0.15
    seed: int = 42
    tokenizer: Path | None = None
    quiet: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    workers: int | None = None  # processes sending requests; None = auto (see workers.py)
    cutoff_len: int | None = None  # training cutoff to check the data against (lengths.py)

    @property
    def params(self) -> dict[str, Any]:
        """The sampling parameters (part of every ledger key)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


@dataclass
class Decision:
    """A row's verdict from the ledger: accepted outcome, final reject, or still pending."""

    row: InputRow
    status: str  # accepted | rejected | pending
    outcome: Outcome | None = None
    sample: int | None = None
    rejects: list[tuple[int, Stored, Outcome]] = field(default_factory=list)


@dataclass
class Progress:
    """Live counters for the progress bar and ``stats.json``'s ``run`` section."""

    total: int = 0
    done: int = 0
    accepted: int = 0
    rejected: int = 0
    sent: int = 0
    retries: Counter = field(default_factory=Counter)
    reused: int = 0
    tokens: int = 0
    stopped: str | None = None
    in_flight: int = 0  # reported by worker processes (the in-process pool counts its own)


def samples_for(row: InputRow, opts: GenerateOptions) -> int:
    return opts.samples if row.split == "train" else 1


def decide(
    row: InputRow,
    task: Task,
    stored: dict[str, Stored],
    keys: list[str],
    *,
    require_gold: bool,
    final_failures: set[str],
) -> Decision:
    """First passing sample wins; a row is rejected once every sample it may use is rejected.

    A request whose retries ran out counts as a reject only in the run where it failed
    (``final_failures``); the next run asks again.
    """
    require = require_gold and row.split == "train"
    rejects = []
    for sample, key in enumerate(keys):
        st = stored.get(key)
        if st is None or (not st.ok and key not in final_failures):
            return Decision(row, "pending", rejects=rejects)
        outcome = normalise(st.response, task, gold=row.gold, require_gold=require)
        if outcome.accepted:
            return Decision(row, "accepted", outcome, sample, rejects)
        rejects.append((sample, st, outcome))
    return Decision(row, "rejected", rejects[-1][2], len(keys) - 1, rejects)


class Runner:
    """One generate run over a set of rows."""

    def __init__(self, opts: GenerateOptions):
        self.opts = opts
        self.task = load_task(opts.task)
        inputs = read_inputs(opts.input, self.task, require_gold=opts.require_gold_match)
        self.duplicates = inputs.duplicates
        self.rows = split_rows(inputs.rows, test_ratio=opts.test_ratio, seed=opts.seed)
        self.model = opts.teachers.key_model
        options = opts.teachers.key_options
        self.keys = {
            row.id: [
                request_key(row.messages, self.model, opts.params, s, options)
                for s in range(samples_for(row, opts))
            ]
            for row in self.rows
        }
        self.count_tokens = token_counter(opts.tokenizer) if opts.tokenizer else None
        opts.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(opts.out / LEDGER)
        self.stored = self.ledger.load()
        # A failed entry from an earlier run is retried; one from this run is final.
        self.failed_this_run: set[str] = set()
        self.progress = Progress(total=len(self.rows))
        self.pool: EndpointPool | None = None
        # [requests sent, tokens used] shared with sibling worker processes (workers.py)
        self.shared: Any = None

    # -- the asynchronous part -------------------------------------------------------------
    def _budget_left(self) -> bool:
        o, p = self.opts, self.progress
        if o.max_requests is not None and p.sent >= o.max_requests:
            p.stopped = p.stopped or f"--max-requests {o.max_requests} reached"
        if o.budget_tokens is not None and p.tokens >= o.budget_tokens:
            p.stopped = p.stopped or f"--budget-tokens {o.budget_tokens} reached"
        return p.stopped is None

    def _claim(self) -> bool:
        """Reserve one new request under ``--max-requests``/``--budget-tokens``."""
        if self.shared is None:
            if not self._budget_left():
                return False
        else:  # the budget is over all workers: check and count under their common lock
            o, p = self.opts, self.progress
            with self.shared.get_lock():
                if o.max_requests is not None and self.shared[0] >= o.max_requests:
                    p.stopped = p.stopped or f"--max-requests {o.max_requests} reached"
                elif o.budget_tokens is not None and self.shared[1] >= o.budget_tokens:
                    p.stopped = p.stopped or f"--budget-tokens {o.budget_tokens} reached"
                else:
                    self.shared[0] += 1
            if p.stopped:
                return False
        self.progress.sent += 1
        return True

    def _spent(self, tokens: int) -> None:
        self.progress.tokens += tokens
        if self.shared is not None:
            with self.shared.get_lock():
                self.shared[1] += tokens

    def _count_retry(self, reason: str) -> None:
        self.progress.retries[reason] += 1

    async def _answer(self, row: InputRow, sample: int, key: str) -> Stored | None:
        st = self.stored.get(key)
        if st is not None and (st.ok or key in self.failed_this_run):
            self.progress.reused += st.ok and key not in self.failed_this_run
            return st
        if not self._claim():
            return None
        assert self.pool is not None
        res: CallResult = await call_with_retries(
            self.pool,
            row.messages,
            self.opts.params,
            sample,
            self.opts.retry,
            on_retry=self._count_retry,
        )
        st = self.ledger.put(  # committed before anything parses it
            key,
            row_id=row.id,
            sample=sample,
            status="ok" if res.ok else "failed",
            response=res.raw,
            endpoint=res.endpoint,
            attempts=res.attempts,
        )
        self.stored[key] = st
        if not res.ok:
            self.failed_this_run.add(key)
        usage = res.raw.get("usage") or {}
        self._spent(usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        return st

    async def _row(self, row: InputRow) -> None:
        require = self.opts.require_gold_match and row.split == "train"
        for sample, key in enumerate(self.keys[row.id]):
            st = await self._answer(row, sample, key)
            if st is None:
                return  # stopped by a budget: the row stays pending
            if normalise(st.response, self.task, gold=row.gold, require_gold=require).accepted:
                self.progress.accepted += 1
                break
        else:
            self.progress.rejected += 1
        self.progress.done += 1

    async def _worker(self, next_row: Callable[[], InputRow | None]) -> None:
        while not self.progress.stopped and (row := next_row()) is not None:
            await self._row(row)

    async def run_async(self, next_row: Callable[[], InputRow | None] | None = None) -> None:
        """Ask the teacher for every row the ledger cannot answer yet.

        ``next_row`` hands out the rows to ask about (worker processes share one cursor over
        the pending rows); by default, this runner's own rows in order.
        """
        specs = self.opts.teachers.teachers
        self.pool = EndpointPool(specs, global_limit=self.opts.concurrency)
        for ep in self.pool.endpoints:
            ep.client = TeacherClient(ep.spec, timeout=self.opts.timeout, stream=self.opts.stream)
        if next_row is None:
            rows = iter(self.rows)
            next_row = lambda: next(rows, None)  # noqa: E731
        # a worker process's rows are every pending row (the cursor hands them out)
        n_workers = max(1, min(self.pool.capacity, len(self.rows)))
        bar = None if self.opts.quiet else _progress_bar(self)
        workers: list[asyncio.Task] = []
        try:
            if bar:
                bar.start()
            # Self-clocked start: one request is launched per turn of the event loop, so the
            # first requests reach the server while later ones are still being launched, at
            # the pace this process can actually serve (no fixed rate to tune per machine).
            # Launching thousands at once instead runs every request's first step before any
            # is sent: they all reach the server in one late burst, all answers come back in
            # one burst, and the waves stay in lockstep, each paying the whole burst's CPU.
            failed: list[asyncio.Task] = []

            def note_failure(task: asyncio.Task) -> None:
                if not task.cancelled() and task.exception() is not None:
                    failed.append(task)

            for _ in range(n_workers):
                w = asyncio.create_task(self._worker(next_row))
                w.add_done_callback(note_failure)
                workers.append(w)
                await asyncio.sleep(0)
                if failed:  # a fatal error (bad key, unknown model): start no more requests
                    break
            await asyncio.gather(*workers)
        finally:
            for w in workers:  # on a fatal error or Ctrl-C: stop the others before closing
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if bar:
                bar.stop()
            for ep in self.pool.endpoints:
                await ep.client.aclose()  # type: ignore[union-attr]

    # -- the deterministic part ------------------------------------------------------------
    def decisions(self) -> list[Decision]:
        return [
            decide(
                r,
                self.task,
                self.stored,
                self.keys[r.id],
                require_gold=self.opts.require_gold_match,
                final_failures=self.failed_this_run,
            )
            for r in self.rows
        ]

    def write(self, elapsed: float) -> dict[str, Any]:
        """Assemble every output from the ledger, in input order, and write it atomically."""
        decisions = self.decisions()
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
                teacher_label = d.outcome.label if d.outcome else None
                test.append(
                    alpaca_record(
                        row.id, row.messages, text or "", row.gold, teacher_label=teacher_label
                    )
                )
            elif text is not None:
                assert d.outcome is not None and d.outcome.label is not None
                train.append(alpaca_record(row.id, row.messages, text, d.outcome.label))
                sharegpt.append(sharegpt_record(row.id, row.messages, text, d.outcome.label))
        stats = build_stats(self, decisions, elapsed)
        stats["lengths"] = lengths.measure(
            train, self.count_tokens, cutoff_len=self.opts.cutoff_len
        )
        write_outputs(
            self.opts.out,
            task_name=self.task.name,
            train=train,
            test=test,
            sharegpt=sharegpt,
            rejects=rejects,
            stats=stats,
            llamafactory=lengths.llamafactory_yaml(
                self.task.name, self.opts.out.resolve(), stats["lengths"]
            ),
        )
        return stats


def _progress_bar(runner: Runner):
    """A rich progress bar: done/total, accepted, rejected, in flight, req/s, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    p = runner.progress
    start = time.monotonic()

    class Live(Progress):
        def get_renderables(self):
            elapsed = max(time.monotonic() - start, 1e-6)
            for t in self.tasks:
                self.update(
                    t.id,
                    completed=p.done,
                    acc=p.accepted,
                    rej=p.rejected,
                    fl=runner.pool.in_flight if runner.pool else p.in_flight,
                    rps=p.sent / elapsed,
                )
            yield from super().get_renderables()

    bar = Live(
        TextColumn("generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]✓ {task.fields[acc]}[/] [red]✗ {task.fields[rej]}[/]"),
        TextColumn("in flight {task.fields[fl]}"),
        TextColumn("{task.fields[rps]:.1f} req/s"),
        TimeRemainingColumn(),
        refresh_per_second=4,
        transient=False,
    )
    bar.add_task("generate", total=p.total, acc=0, rej=0, fl=0, rps=0.0)
    return bar


def run_loop(coro) -> Any:
    """Run a coroutine on uvloop when it is installed (less CPU per request), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


GC_THRESHOLD = 20_000  # allocations between young-generation collections while sending


@contextlib.contextmanager
def sending_gc() -> Iterator[None]:
    """Garbage-collector settings for the sending phase, restored afterwards.

    Thousands of requests in flight keep hundreds of thousands of objects alive, and with the
    default thresholds (a collection every 700 allocations) the collector rescans them about
    every request: measured at 0.2 ms of CPU per request, a fifth of the client's cost. The
    objects that live through the run (modules, inputs, ledger rows) are frozen out of the
    collector's view, and young collections run every 20,000 allocations (measured: under
    0.03 ms per request).
    """
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def send_requests(runner: Runner) -> None:
    """Ask the teacher for what the ledger lacks: in this process, or over worker processes."""
    from pipeline.generate.workers import plan_workers, run_in_workers

    n = plan_workers(runner)
    if n <= 1:
        with sending_gc():
            run_loop(runner.run_async())
    else:
        run_in_workers(runner, n)


def run_generate(opts: GenerateOptions) -> dict[str, Any]:
    """Run the stage end to end; returns the stats written to ``stats.json``."""
    start = time.monotonic()
    runner = Runner(opts)
    try:
        # a re-run the ledger answers completely needs no teacher (nor its key)
        decisions = runner.decisions()
        if any(d.status == "pending" for d in decisions):
            send_requests(runner)
        else:  # every answer read back, counted as the sending path counts them
            runner.progress.reused = sum((d.sample or 0) + 1 for d in decisions)
        return runner.write(time.monotonic() - start)
    finally:
        runner.ledger.close()
