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
from collections import Counter
from collections.abc import Callable

from pipeline.generate.teachers import EndpointPool, TeachersConfig, TeacherSpec

# auto: one more worker per this many requests in flight / pending rows. Each wave of N
# answers costs about N x (client + stand-in CPU per request) to turn around, spread over the
# cores, so at 2,000 in flight one process (one core) stretches every wave twice as long as
# two; below 1,000 slots one process keeps up and stays the default.
ROWS_PER_WORKER = 1000
REPORT_S = 0.25  # how often a worker reports its counters to the parent


class WorkerError(RuntimeError):
    """A worker process failed (its message says why; the ledger keeps every answer)."""


def plan_workers(runner) -> int:
    """How many processes send requests: ``opts.workers``, or auto (1 for small runs)."""
    opts = runner.opts
    capacity = EndpointPool(opts.teachers.teachers, global_limit=opts.concurrency).capacity
    pending = sum(d.status == "pending" for d in runner.decisions())
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


def _snapshot(runner) -> tuple:
    p = runner.progress
    return (p.done, p.accepted, p.rejected, p.sent, p.reused, p.tokens, runner.pool.in_flight)


_INHERITED: list = []  # the parent's ledger handle, never touched (nor closed) after a fork


def _worker_runner(source, opts, row_ids: list[str], shared):
    """The worker's Runner: the parent's own (forked) or, under spawn, one built from opts."""
    from pipeline.generate.ledger import Ledger
    from pipeline.generate.run import LEDGER, Progress, Runner

    if isinstance(source, Runner):  # fork: inputs, keys and ledger contents are inherited
        runner = source
        _INHERITED.append(runner.ledger)
        runner.ledger = Ledger(opts.out / LEDGER)  # SQLite handles must not cross a fork
        runner.opts, runner.pool, runner.failed_this_run = opts, None, set()
    else:
        runner = Runner(opts)
    by_id = {r.id: r for r in runner.rows}
    runner.rows = [by_id[i] for i in row_ids]  # every pending row, in the parent's order
    runner.progress = Progress(total=len(runner.rows))
    runner.shared = shared
    return runner


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
        from pipeline.generate.client import FatalError
        from pipeline.generate.run import run_loop, sending_gc

        runner = _worker_runner(source, opts, row_ids, shared)
        next_row = _cursor(runner.rows, cursor)

        async def main() -> None:
            import asyncio

            async def report() -> None:
                while True:
                    await asyncio.sleep(REPORT_S)
                    if runner.pool is not None:
                        conn.send(("progress", _snapshot(runner)))

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
        p = runner.progress
        conn.send(
            (
                "final",
                {
                    "progress": _snapshot(runner)[:-1],
                    "retries": dict(p.retries),
                    "stopped": p.stopped,
                    "failed": sorted(runner.failed_this_run),
                    "endpoints": {
                        ep.name: (ep.attempts, ep.throttled, int(ep.limit))
                        for ep in runner.pool.endpoints  # type: ignore[union-attr]
                    },
                },
            )
        )
    except BaseException:  # anything else: tell the parent, then exit
        conn.send(("error", traceback.format_exc(limit=8)))
    finally:
        conn.close()


# -- the parent ------------------------------------------------------------------------------


def run_in_workers(runner, n: int) -> None:
    """Send the runner's pending rows through ``n`` worker processes; fold their results in."""
    from pipeline.generate.client import FatalError, tls_context
    from pipeline.generate.run import _progress_bar

    opts = runner.opts
    p = runner.progress
    pending = []
    for d in runner.decisions():
        if d.status == "pending":
            pending.append(d.row.id)
        else:  # answered by the ledger already: counted here, as the in-process path does
            p.done += 1
            p.reused += (d.sample or 0) + 1
            if d.status == "accepted":
                p.accepted += 1
            else:
                p.rejected += 1
    base = (p.done, p.accepted, p.rejected, p.sent, p.reused, p.tokens)
    parts = split_teachers(opts.teachers, opts.concurrency, n)
    # fork: workers start at once and inherit the parsed inputs and ledger (no re-import of
    # the SDK, no re-read); spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    forked = ctx.get_start_method() == "fork"
    sys.stdout.flush()
    sys.stderr.flush()
    shared = ctx.Array("q", 2)  # requests sent, tokens used: by all workers together
    cursor = ctx.Value("q", 0)  # index of the next pending row to hand out
    if any(t.base_url.lower().startswith("https:") for t in opts.teachers.teachers):
        tls_context()  # built once here, inherited by forked workers
    procs, conns = [], []
    for i, (cfg, cap) in enumerate(parts):
        wopts = dataclasses.replace(
            opts, teachers=cfg, concurrency=cap, quiet=True, tokenizer=None, workers=1
        )
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=worker_main,
            args=(runner if forked else None, wopts, pending, shared, cursor, child_end),
            name=f"generate-worker-{i}",
            daemon=True,
        )
        proc.start()
        child_end.close()
        procs.append(proc)
        conns.append(parent_end)

    snaps: dict[int, tuple] = {}
    finals: dict[int, dict] = {}
    bar = None if opts.quiet else _progress_bar(runner)
    try:
        if bar:
            bar.start()
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
                    snaps[i] = payload
                elif kind == "final":
                    finals[i] = payload
                    snaps[i] = (*payload["progress"], 0)
                elif kind == "fatal":
                    raise FatalError(payload)
                else:
                    raise WorkerError(f"generate worker {i} failed:\n{payload}")
                _fold(p, base, snaps.values())
    finally:
        for proc in procs:  # on an error or Ctrl-C: stop the others (answers are committed)
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join(10)
        if bar:
            bar.stop()

    _fold(p, base, snaps.values())
    p.in_flight = 0
    for f in finals.values():
        p.retries.update(Counter(f["retries"]))
        p.stopped = p.stopped or f["stopped"]
        runner.failed_this_run.update(f["failed"])
    runner.stored = runner.ledger.load()  # everything the workers committed
    pool = runner.pool = EndpointPool(opts.teachers.teachers, global_limit=opts.concurrency)
    for ep in pool.endpoints:
        ep.limit = 0.0
        for f in finals.values():
            attempts, throttled, limit = f["endpoints"].get(ep.name, (0, 0, 0))
            ep.attempts += attempts
            ep.throttled += throttled
            ep.limit += limit


def _fold(p, base: tuple, snaps) -> None:
    """Parent counters = rows the ledger answered + every worker's latest report."""
    done, acc, rej, sent, reused, tokens = base
    fl = 0
    for s in snaps:
        done, acc, rej = done + s[0], acc + s[1], rej + s[2]
        sent, reused, tokens = sent + s[3], reused + s[4], tokens + s[5]
        fl += s[6]
    p.done, p.accepted, p.rejected, p.sent, p.reused, p.tokens, p.in_flight = (
        done,
        acc,
        rej,
        sent,
        reused,
        tokens,
        fl,
    )
