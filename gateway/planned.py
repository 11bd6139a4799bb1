"""Budgets, label-constrained answers and system-prompt injection on the request path.

The app calls :meth:`Features.prepare` on each parsed body (before it becomes the upstream
body): it injects the task's system prompt when asked to, and returns a
:class:`~gateway.budget.Plan` or ``None``. ``None`` (a request that asks for nothing, for a
model with no task) is served exactly as before. A plan is run by :mod:`gateway.phases` over
the app's own upstream calls: :func:`complete_planned` for whole responses,
:class:`PlannedStream` (read by the relay like one upstream response) for streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.budget import BudgetTable, Plan, plan_request, wants_budget
from gateway.phases import Report, run_stream, run_whole
from gateway.protocol import GatewayError
from gateway.sse import SSEDecoder
from gateway.sysprompt import inject_system_prompt
from gateway.tasks import TaskRegistry

Call = Callable[[bytes], Awaitable[tuple[Any, Any]]]
USED_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


class FeatureMetrics:
    """The features' metrics, in the app's registry (``model`` is a bounded label)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "gateway_"
        self.hits = Counter(
            p + "reasoning_budget_hits",
            "Requests whose reasoning was cut at its budget.",
            ["model"],
            registry=registry,
        )
        self.forced = Counter(
            p + "forced_answers",
            "Answers started by the gateway closing the think section: budget (hit), none "
            "(no reasoning asked), unclosed (the model stopped without closing it).",
            ["model", "reason"],
            registry=registry,
        )
        self.used = Histogram(
            p + "reasoning_budget_used_ratio",
            "Reasoning tokens spent over the budget, per request with a budget above 0.",
            ["model"],
            buckets=USED_BUCKETS,
            registry=registry,
        )
        self.constrained = Counter(
            p + "constrained_answers",
            "Answers constrained to the task's labels.",
            ["model"],
            registry=registry,
        )
        self.injected = Counter(
            p + "system_prompts_injected",
            "Requests given the task's system prompt (GATEWAY_INJECT_SYSTEM_PROMPT).",
            ["model"],
            registry=registry,
        )

    def start(self, model: str) -> None:
        """Zero-valued series for a model with a task, so dashboards have them from the start."""
        self.hits.labels(model)
        for reason in ("budget", "none", "unclosed"):
            self.forced.labels(model, reason)
        self.used.labels(model)
        self.constrained.labels(model)
        self.injected.labels(model)

    def observe(self, model: str, report: Report) -> None:
        if report.hit:
            self.hits.labels(model).inc()
        if report.forced is not None:
            self.forced.labels(model, report.forced).inc()
        if report.budget:
            self.used.labels(model).observe(report.reasoning_tokens / report.budget)
        if report.constrained:
            self.constrained.labels(model).inc()


class Features:
    """Per app: the budget table, the tasks, whether to inject prompts, the metrics."""

    def __init__(
        self,
        tasks: TaskRegistry,
        registry: CollectorRegistry,
        *,
        budgets: BudgetTable | None = None,
        inject_system_prompt: bool = False,
    ) -> None:
        self.tasks = tasks
        self.table = budgets or BudgetTable()
        self.inject = inject_system_prompt
        self.metrics = FeatureMetrics(registry)
        for model in tasks.models():
            self.metrics.start(model)

    def prepare(self, data: dict[str, Any], label: Callable[[str], str]) -> Plan | None:
        """Inject the system prompt (if on) and plan the request; ``label`` maps the model
        name to its metric label."""
        task = self.tasks.get(data.get("model"))
        if task is None and not wants_budget(data, self.table):
            return None
        if self.inject and task is not None and inject_system_prompt(data, task):
            self.metrics.injected.labels(label(data["model"])).inc()
        return plan_request(data, self.table, task)

    def observer(self, model: str) -> Callable[[Report], None]:
        return lambda report: self.metrics.observe(model, report)


class _Failed(Exception):
    """A phase's upstream answer that is not a usable completion: handed to the app as is."""

    def __init__(self, response: Any, raw: bytes) -> None:
        self.response, self.raw = response, raw


async def complete_planned(
    plan: Plan, payload: bytes, call: Call, done: Callable[[Report], None]
) -> tuple[Any, bytes]:
    """Run ``plan`` not streamed; ``call(body) -> (response, raw body)`` is one upstream
    call. Returns (the last response, the combined body), or a failed phase's pair."""
    last: Any = None

    async def one(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal last
        response, raw = await call(orjson.dumps(body))
        last = response
        if response.status != 200:
            raise _Failed(response, raw)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Failed(response, raw) from None
        if not isinstance(data, dict):
            raise _Failed(response, raw)
        return data

    try:
        result = await run_whole(plan, orjson.loads(payload), one, done)
    except _Failed as failed:
        return failed.response, failed.raw
    return last, orjson.dumps(result)


class PlannedStream:
    """A planned stream, read by the app's relay like one upstream response.

    ``open_ok(body) -> lease`` opens one upstream stream (raising on a non-200); the leases
    belong to the app's call, which ends them all when the request ends. :meth:`opened`
    opens the first phase, so errors before the first byte are plain HTTP errors.
    """

    def __init__(
        self, plan: Plan, payload: bytes, open_ok: Call, done: Callable[[Report], None]
    ) -> None:
        self._open_ok = open_ok
        self._done = done
        self._finished = False
        self._first: dict[str, Any] | None = None
        self._events = run_stream(plan, orjson.loads(payload), self._phase, self._report)

    async def opened(self) -> PlannedStream:
        """Open the first phase; return what the relay reads."""
        with contextlib.suppress(StopAsyncIteration):
            self._first = await self._events.__anext__()
        return self

    def _report(self, report: Report) -> None:
        self._finished = True
        self._done(report)

    async def _phase(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        lease = await self._open_ok(orjson.dumps(body))
        ended = False
        decoder = SSEDecoder()
        try:
            async for piece in lease.chunks():
                for payload in decoder.feed(piece):
                    if payload == b"[DONE]":
                        ended = True
                    elif not ended:
                        try:
                            event = orjson.loads(payload)
                        except orjson.JSONDecodeError:
                            raise GatewayError(
                                502, "the model server sent a malformed stream event",
                                reason="bad_response",
                            ) from None  # fmt: skip
                        if isinstance(event, dict):
                            yield event
            if not ended:
                raise GatewayError(502, "the model server ended the stream early", reason="closed")
        finally:
            lease.end()  # a phase cut short closes its connection: vLLM aborts it

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._first is not None:
            first, self._first = self._first, None
            yield b"data: " + orjson.dumps(first) + b"\n\n"
        async for event in self._events:
            yield b"data: " + orjson.dumps(event) + b"\n\n"
        if self._finished:
            yield b"data: [DONE]\n\n"
