"""What a generate run knows while it runs: its counters, its request budget, its progress bar.

Plain data, shared by the runner (one process), the worker processes and ``stats.json``:

* :class:`RunState` - everything this invocation counted (a worker sends its own to the parent
  when it is done, and the parent merges them);
* :class:`Snapshot` - the live counters the progress bar shows (workers report one every
  quarter second);
* :class:`Budget` - ``--max-requests`` / ``--budget-tokens``, over one process or, in shared
  memory, over all the workers.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live counters of a run (or of one worker's share of it) at one moment."""

    done: int = 0
    accepted: int = 0
    rejected: int = 0
    sent: int = 0
    reused: int = 0
    tokens: int = 0
    in_flight: int = 0

    def __add__(self, other: Snapshot) -> Snapshot:
        return Snapshot(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True, slots=True)
class EndpointTally:
    """One teacher endpoint's figures at the end of a run."""

    attempts: int = 0
    throttled: int = 0  # answered 429
    limit: int = 0  # its adaptive concurrency limit at the end

    def __add__(self, other: EndpointTally) -> EndpointTally:
        return EndpointTally(
            self.attempts + other.attempts,
            self.throttled + other.throttled,
            self.limit + other.limit,
        )


@dataclass
class RunState:
    """Everything one invocation counted: ``stats.json``'s ``run`` section comes from it."""

    total: int = 0  # rows in this run
    done: int = 0
    accepted: int = 0
    rejected: int = 0
    sent: int = 0  # requests sent by this invocation
    reused: int = 0  # answers taken from the ledger instead
    tokens: int = 0
    retries: Counter = field(default_factory=Counter)
    stopped: str | None = None  # why sending stopped early (a budget), if it did
    failed: set[str] = field(default_factory=set)  # ledger keys whose retries ran out here
    endpoints: dict[str, EndpointTally] = field(default_factory=dict)

    def snapshot(self, in_flight: int = 0) -> Snapshot:
        return Snapshot(
            self.done, self.accepted, self.rejected, self.sent, self.reused, self.tokens, in_flight
        )

    def retried(self, reason: str) -> None:
        self.retries[reason] += 1

    def stop(self, reason: str) -> None:
        """Stop sending; the first reason given is the one reported."""
        self.stopped = self.stopped or reason

    def merge(self, other: RunState) -> None:
        """Add another part of the same run (a worker's, or rows the ledger answered)."""
        self.done += other.done
        self.accepted += other.accepted
        self.rejected += other.rejected
        self.sent += other.sent
        self.reused += other.reused
        self.tokens += other.tokens
        self.retries.update(other.retries)
        if other.stopped:
            self.stop(other.stopped)
        self.failed |= other.failed
        for name, tally in other.endpoints.items():
            self.endpoints[name] = self.endpoints.get(name, EndpointTally()) + tally


class Budget:
    """``--max-requests`` / ``--budget-tokens``: requests and tokens counted against them.

    The counts are this process's own, or a ``multiprocessing`` ``Array('q', 2)`` that all
    the workers check and count under its lock, so the limits hold over the whole run.
    """

    def __init__(
        self, max_requests: int | None, max_tokens: int | None, shared: Any | None = None
    ) -> None:
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self._counts: Any = [0, 0] if shared is None else shared  # [requests, tokens]
        self._lock = contextlib.nullcontext() if shared is None else shared.get_lock()

    def claim(self) -> str | None:
        """Count one more request, or say why it may not be sent (the budget is spent)."""
        with self._lock:
            if self.max_requests is not None and self._counts[0] >= self.max_requests:
                return f"--max-requests {self.max_requests} reached"
            if self.max_tokens is not None and self._counts[1] >= self.max_tokens:
                return f"--budget-tokens {self.max_tokens} reached"
            self._counts[0] += 1
        return None

    def spend(self, tokens: int) -> None:
        with self._lock:
            self._counts[1] += tokens


@contextlib.contextmanager
def progress_bar(total: int, read: Callable[[], Snapshot], *, show: bool = True) -> Iterator[None]:
    """A rich progress bar over ``read()`` while the block runs: done/total, accepted,
    rejected, in flight, req/s, ETA. Nothing at all when ``show`` is false."""
    if not show:
        yield
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    start = time.monotonic()

    class Live(Progress):
        def get_renderables(self):
            elapsed = max(time.monotonic() - start, 1e-6)
            s = read()
            for t in self.tasks:
                self.update(
                    t.id,
                    completed=s.done,
                    acc=s.accepted,
                    rej=s.rejected,
                    fl=s.in_flight,
                    rps=s.sent / elapsed,
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
    bar.add_task("generate", total=total, acc=0, rej=0, fl=0, rps=0.0)
    bar.start()
    try:
        yield
    finally:
        bar.stop()
