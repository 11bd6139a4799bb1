"""Spread a run's teacher requests over worker processes, so the client can use every core.

The openai SDK and its HTTP transport cost about 1 ms of CPU per streamed request and one
event loop lives on one core, so at thousands of requests in flight a single process, not the
teacher, sets the pace. With ``--workers N`` (auto: ``min(cores, ceil(capacity / 1000),
ceil(pending rows / 1000))``, so most runs stay in one process) the parent:

* decides from the ledger which rows still need the teacher and forks N workers (spawned
  where fork does not exist), each with its own event loop (uvloop when installed) and its
  own ``AsyncOpenAI`` client; the workers take the pending rows one at a time from a cursor
  they share, so a worker that gets more CPU (or fewer retries) does more of the work and
  none sits idle at the end while another still has a backlog;
* gives every worker 1/N of each endpoint's ``max_concurrency`` (and the same share of its
  rpm/tpm) and of the global cap, so the sums are what the user asked for; each worker's pool
  adapts to 429s on its own share;
* keeps ``--max-requests`` / ``--budget-tokens`` exact with counters in shared memory;
* shows the progress bar from the workers' reports and writes every file itself from the
  ledger once they are done.

Each worker commits each raw response to the shared SQLite (WAL) ledger itself, before it is
parsed, exactly as a single-process run does. A worker exits as soon as its parent dies
(it watches the parent's process sentinel), so after a ``kill -9`` of the parent no worker
is left sending or committing, and the re-run resumes from the ledger.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from pipeline.generate.client import FatalError, tls_context
from pipeline.generate.ledger import Stored
from pipeline.generate.runner import (
    Decision,
    GenerateOptions,
    Plan,
    Runner,
    run_loop,
    sending_gc,
)
from pipeline.generate.state import Budget, EndpointTally, RunState, Snapshot, progress_bar
from pipeline.generate.teachers import EndpointPool, TeachersConfig, TeacherSpec

# auto: one more worker per this many requests in flight / pending rows. Each wave of N
# answers costs about N x (client + stand-in CPU per request) to turn around, spread over the
# cores, so at 2,000 in flight one process (one core) stretches every wave twice as long as
# two; below 1,000 slots one process keeps up and stays the default.
ROWS_PER_WORKER = 1000
REPORT_S = 0.25  # how often a worker reports its counters to the parent


class WorkerError(RuntimeError):
    """A worker process failed (its message says why; the ledger keeps every answer)."""


def plan_workers(opts: GenerateOptions, pending: int) -> int:
    """How many processes send ``pending`` rows: ``opts.workers``, or auto (1 for small runs)."""
    capacity = EndpointPool(opts.teachers.teachers, global_limit=opts.concurrency).capacity
    if opts.workers is not None:
        n = opts.workers
    else:
        n = min(
            available_cores(),
            math.ceil(capacity / ROWS_PER_WORKER),
            math.ceil(pending / ROWS_PER_WORKER),
        )
    return max(1, min(n, capacity, pending))


def available_cores() -> int:
    """CPU cores this process may run on (a container's or ``taskset``'s share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _share(total: int, n: int, i: int) -> int:
    return total // n + (1 if i < total % n else 0)


def split_teachers(
    cfg: TeachersConfig, concurrency: int | None, n: int
) -> list[tuple[TeachersConfig, int | None]]:
    """Each worker's endpoints and global cap: 1/N of every limit, summing to the original.

    An endpoint's leftover slots go to the next workers in turn, so that every worker gets
    at least one slot when there are at least N in all; rpm/tpm follow the concurrency share.
    """
    specs: list[list[TeacherSpec]] = [[] for _ in range(n)]
    cursor = 0
    for spec in cfg.teachers:
        m = spec.max_concurrency
        extra = m % n
        for i in range(n):
            share = m // n + (1 if (i - cursor) % n < extra else 0)
            if share == 0:
                continue
            frac = share / m
            specs[i].append(
                spec.model_copy(
                    update={
                        "max_concurrency": share,
                        "rpm": spec.rpm * frac if spec.rpm else None,
                        "tpm": spec.tpm * frac if spec.tpm else None,
                    }
                )
            )
        cursor = (cursor + extra) % n
    out = []
    for i in range(n):
        cap = _share(concurrency, n, i) if concurrency else None
        if not specs[i] or cap == 0:
            raise ValueError(f"worker {i} would get no request slot: use fewer workers")
        keyed = {"ledger_model": cfg.key_model, "ledger_options": cfg.key_options or {}}
        out.append((TeachersConfig(teachers=specs[i], **keyed), cap))
    return out


# -- the worker process ----------------------------------------------------------------------


def _die_with_parent() -> None:
    """Exit at once when the parent process is gone (a ``kill -9`` leaves no orphan)."""
    parent = mp.parent_process()
    if parent is None:
        return

    ppid = os.getppid()

    def watch() -> None:
        # the sentinel closes when the parent dies; the ppid check also covers a sentinel a
        # forked sibling happens to hold open
        while not mpc.wait([parent.sentinel], timeout=0.5) and os.getppid() == ppid:
            pass
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _worker_runner(
    source: tuple[Plan, dict[str, Stored]] | None,
    opts: GenerateOptions,
    row_ids: list[str],
    shared,
) -> Runner:
    """The worker's Runner over the pending rows, under the budget all workers share.

    ``source`` is the parent's plan and ledger contents, inherited by a forked worker (nothing
    read again); under spawn (``None``) the worker reads them itself. Either way it opens its
    own ledger connection: SQLite handles must not cross a fork, and the parent's stays
    untouched in the child (it is only referenced from the parent's frames, which a forked
    child never returns to).
    """
    budget = Budget(opts.max_requests, opts.budget_tokens, shared)
    if source is None:
        return Runner(opts, Plan.load(opts).only(row_ids), budget=budget)
    plan, stored = source
    return Runner(opts, plan.only(row_ids), stored=stored, budget=budget)


def _cursor(rows: list, cursor) -> Callable:
    """``next_row`` over ``rows`` for one worker: the index is shared by all workers, so a
    worker that gets ahead (more CPU, fewer retries) takes more rows and none waits at the end
    for another's backlog."""

    def next_row():
        with cursor.get_lock():
            i = cursor.value
            if i >= len(rows):
                return None
            cursor.value = i + 1
        return rows[i]

    return next_row


def worker_main(source, opts, row_ids: list[str], shared, cursor, conn) -> None:
    """Entry point of one worker: run pending rows taken from the shared ``cursor``, report
    counters, then a final summary."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        runner = _worker_runner(source, opts, row_ids, shared)
        next_row = _cursor(runner.plan.rows, cursor)

        async def main() -> None:
            import asyncio

            async def report() -> None:
                while True:
                    await asyncio.sleep(REPORT_S)
                    conn.send(("progress", runner.snapshot()))

            reporter = asyncio.create_task(report())
            try:
                await runner.run_async(next_row)
            finally:
                reporter.cancel()

        try:
            with sending_gc():
                run_loop(main())
        except FatalError as e:
            conn.send(("fatal", str(e)))
            return
        finally:
            runner.ledger.close()
        conn.send(("final", runner.state))
    except BaseException:  # anything else: tell the parent, then exit
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        conn.close()


# -- the parent ------------------------------------------------------------------------------


def _answered(decisions: list[Decision]) -> RunState:
    """The rows the ledger has answered already, counted as the in-process runner counts them."""
    state = RunState()
    for d in decisions:
        if d.status == "pending":
            continue
        state.done += 1
        state.reused += (d.sample or 0) + 1
        if d.status == "accepted":
            state.accepted += 1
        else:
            state.rejected += 1
    return state


def _start(runner: Runner, n: int, pending: list[str]) -> tuple[list, list]:
    """Fork (spawn where fork does not exist) ``n`` workers over ``pending``: (processes, pipes)."""
    opts = runner.opts
    parts = split_teachers(opts.teachers, opts.concurrency, n)
    # fork: workers start at once and inherit the parsed inputs and ledger (no re-import of
    # the SDK, no re-read); spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    source = (runner.plan, runner.stored) if ctx.get_start_method() == "fork" else None
    sys.stdout.flush()
    sys.stderr.flush()
    shared = ctx.Array("q", 2)  # requests sent, tokens used: by all workers together
    cursor = ctx.Value("q", 0)  # index of the next pending row to hand out
    if any(t.base_url.lower().startswith("https:") for t in opts.teachers.teachers):
        tls_context()  # built once here, inherited by forked workers
    procs, conns = [], []
    for i, (cfg, cap) in enumerate(parts):
        wopts = dataclasses.replace(opts, teachers=cfg, concurrency=cap)
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=worker_main,
            args=(source, wopts, pending, shared, cursor, child_end),
            name=f"generate-worker-{i}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        procs.append(proc)
        conns.append(parent_end)
    return procs, conns


def run_in_workers(runner: Runner, n: int) -> None:
    """Send the runner's pending rows through ``n`` worker processes; fold their results into
    ``runner.state`` and its view of the ledger."""
    opts = runner.opts
    decisions = runner.decisions()
    pending = [d.row.id for d in decisions if d.status == "pending"]
    answered = _answered(decisions)
    latest: dict[int, Snapshot] = {}  # each worker's last report
    finals: dict[int, RunState] = {}
    shown = answered.snapshot()  # what the progress bar reads (replaced, never mutated)

    procs, conns = _start(runner, n, pending)
    try:
        with progress_bar(runner.state.total, lambda: shown, show=not opts.quiet):
            open_conns = dict(enumerate(conns))
            while open_conns:
                for c in mpc.wait(list(open_conns.values()), timeout=1.0):
                    i = next(k for k, v in open_conns.items() if v is c)
                    try:
                        kind, payload = c.recv()
                    except EOFError:
                        del open_conns[i]
                        if i not in finals:
                            procs[i].join(5)
                            raise WorkerError(
                                f"generate worker {i} died (exit code {procs[i].exitcode}); "
                                "every answer received is in the ledger: re-run to resume"
                            ) from None
                        continue
                    if kind == "progress":
                        latest[i] = payload
                    elif kind == "final":
                        finals[i] = payload
                        latest[i] = payload.snapshot()
                    elif kind == "fatal":
                        raise FatalError(payload)
                    else:
                        raise WorkerError(f"generate worker {i} failed:\n{payload}")
                    shown = sum(latest.values(), answered.snapshot())
    finally:
        for proc in procs:  # on an error or Ctrl-C: stop the others (answers are committed)
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(10)

    state = runner.state
    for part in (answered, *finals.values()):
        state.merge(part)
    # every endpoint, in the configured order, whether or not a worker used it
    state.endpoints = {
        t.name: state.endpoints.get(t.name, EndpointTally()) for t in opts.teachers.teachers
    }
    runner.reload()  # everything the workers committed
