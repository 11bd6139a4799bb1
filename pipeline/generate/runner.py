"""Ask the teacher, in one process, for every row of a run that the ledger cannot answer yet.

``--samples K`` keeps the **first sample that passes** (samples are asked one after another
and only until one passes): it is the rejection-sampling rule, it never pays for samples it
does not need, and with ``--require-gold-match`` a majority vote would add nothing.
Held-out (test) rows are asked once (sample 0) without the gold filter, so the teacher's
accuracy can be measured on exactly the split the student is evaluated on.

A :class:`Runner` is one process's share of a run: the whole run by default, or (worker
processes, ``workers.py``) the rows a shared cursor hands it, under a budget they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_common.task import Task, load_task
from pipeline.generate.client import CallResult, RetryPolicy, TeacherClient, call_with_retries
from pipeline.generate.inputs import InputRow, read_inputs, split_rows
from pipeline.generate.ledger import Ledger, Stored, request_key
from pipeline.generate.normalise import Outcome, normalise
from pipeline.generate.state import Budget, EndpointTally, RunState, Snapshot
from pipeline.generate.teachers import EndpointPool, TeachersConfig

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


@dataclass
class Plan:
    """A run's task, rows (in input order) and each row's ledger keys, one per sample."""

    task: Task
    rows: list[InputRow]
    keys: dict[str, list[str]]
    duplicates: int = 0  # input rows dropped as exact duplicates

    @classmethod
    def load(cls, opts: GenerateOptions) -> Plan:
        task = load_task(opts.task)
        inputs = read_inputs(opts.input, task, require_gold=opts.require_gold_match)
        rows = split_rows(inputs.rows, test_ratio=opts.test_ratio, seed=opts.seed)
        model, options = opts.teachers.key_model, opts.teachers.key_options
        keys = {
            row.id: [
                request_key(row.messages, model, opts.params, s, options)
                for s in range(opts.samples if row.split == "train" else 1)
            ]
            for row in rows
        }
        return cls(task, rows, keys, inputs.duplicates)

    def only(self, ids: list[str]) -> Plan:
        """The same run restricted to the rows ``ids``, in that order."""
        by_id = {r.id: r for r in self.rows}
        return Plan(self.task, [by_id[i] for i in ids], self.keys, self.duplicates)


class Runner:
    """One process's share of a generate run over its ledger.

    ``plan`` defaults to the one ``opts`` describes, ``stored`` to what the ledger holds,
    ``budget`` to this process's own counts against ``--max-requests``/``--budget-tokens``.
    """

    def __init__(
        self,
        opts: GenerateOptions,
        plan: Plan | None = None,
        *,
        stored: dict[str, Stored] | None = None,
        budget: Budget | None = None,
    ):
        self.opts = opts
        self.plan = plan if plan is not None else Plan.load(opts)
        opts.out.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(opts.out / LEDGER)
        self.stored = self.ledger.load() if stored is None else stored
        # state.failed: a failed entry from an earlier run is retried; one from this run is final
        self.state = RunState(total=len(self.plan.rows))
        self.budget = budget or Budget(opts.max_requests, opts.budget_tokens)
        self.pool: EndpointPool | None = None

    # -- what the ledger says ----------------------------------------------------------------
    def decisions(self) -> list[Decision]:
        return [
            decide(
                r,
                self.plan.task,
                self.stored,
                self.plan.keys[r.id],
                require_gold=self.opts.require_gold_match,
                final_failures=self.state.failed,
            )
            for r in self.plan.rows
        ]

    def answers(self) -> list[Stored]:
        """Ledger rows that belong to this run's inputs and settings (a ledger may hold more)."""
        return [self.stored[k] for ks in self.plan.keys.values() for k in ks if k in self.stored]

    def reload(self) -> None:
        """Take in what other processes (the workers) committed to the ledger."""
        self.stored = self.ledger.load()

    def snapshot(self) -> Snapshot:
        return self.state.snapshot(self.pool.in_flight if self.pool else 0)

    # -- asking the teacher --------------------------------------------------------------------
    async def _answer(self, row: InputRow, sample: int, key: str) -> Stored | None:
        failed = self.state.failed
        st = self.stored.get(key)
        if st is not None and (st.ok or key in failed):
            self.state.reused += st.ok and key not in failed
            return st
        if (stop := self.budget.claim()) is not None:
            self.state.stop(stop)
            return None
        self.state.sent += 1
        assert self.pool is not None
        res: CallResult = await call_with_retries(
            self.pool,
            row.messages,
            self.opts.params,
            sample,
            self.opts.retry,
            on_retry=self.state.retried,
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
            failed.add(key)
        usage = res.raw.get("usage") or {}
        tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        self.state.tokens += tokens
        self.budget.spend(tokens)
        return st

    async def _row(self, row: InputRow) -> None:
        require = self.opts.require_gold_match and row.split == "train"
        for sample, key in enumerate(self.plan.keys[row.id]):
            st = await self._answer(row, sample, key)
            if st is None:
                return  # stopped by a budget: the row stays pending
            if normalise(st.response, self.plan.task, gold=row.gold, require_gold=require).accepted:
                self.state.accepted += 1
                break
        else:
            self.state.rejected += 1
        self.state.done += 1

    async def _worker(self, next_row: Callable[[], InputRow | None]) -> None:
        while not self.state.stopped and (row := next_row()) is not None:
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
            rows = iter(self.plan.rows)
            next_row = lambda: next(rows, None)  # noqa: E731
        # a worker process's rows are every pending row (the cursor hands them out)
        n_workers = max(1, min(self.pool.capacity, len(self.plan.rows)))
        workers: list[asyncio.Task] = []
        try:
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
            for ep in self.pool.endpoints:
                await ep.client.aclose()  # type: ignore[union-attr]
            self.state.endpoints = {
                ep.name: EndpointTally(ep.attempts, ep.throttled, int(ep.limit))
                for ep in self.pool.endpoints
            }


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
    every request, a fifth of the client's CPU per request. The objects that live through the
    run (modules, inputs, ledger rows) are frozen out of the collector's view, and young
    collections run every 20,000 allocations.
    """
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
