"""What one gateway instance shares across requests, and how a finished request is recorded."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

from gateway.accesslog import AccessLog
from gateway.auth import Authenticator, KeyState, load_keys
from gateway.budget import BudgetTable
from gateway.discovery import DnsDiscovery, DnsTarget
from gateway.metrics import KnownModels, Metrics
from gateway.modes import Outcome
from gateway.planned import Features
from gateway.settings import Settings
from gateway.shadow import Shadow, ShadowSettings
from gateway.tasks import TaskRegistry
from gateway.tokens import load_counter
from gateway.upstreams import UpstreamPool


class Gateway:
    """Everything one app instance shares: settings, upstream pool, keys, metrics, log."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pool = UpstreamPool(settings, self.metrics)
        self.auth = Authenticator(load_keys(settings))
        # metric labels: configured names and tasks now, the upstreams' /v1/models lists later
        self.models = KnownModels([*settings.models, *settings.tasks])
        self.tasks = TaskRegistry.load(settings.tasks)
        self.discovery = self._discovery(settings)
        self.features = Features(
            self.tasks, self.metrics.registry,
            budgets=BudgetTable.load(settings.reasoning_budgets),
            inject_system_prompt=settings.inject_system_prompt,
        )  # fmt: skip
        self.shadow = Shadow(ShadowSettings(), self.tasks, self.metrics.registry)
        self.access = AccessLog(settings.access_log)
        self.tokens = load_counter(settings.tokenizer)  # exact with GATEWAY_TOKENIZER
        self.metrics.set_token_counts_exact(self.tokens.exact)
        self._ids = itertools.count(1)
        self._id_prefix = f"gw-{os.getpid():x}-{int(time.time()) & 0xFFFFFF:x}-"

    def _discovery(self, settings: Settings) -> DnsDiscovery | None:
        """``GATEWAY_UPSTREAMS_DNS``: the pool's members follow the name's addresses."""
        if not settings.upstreams_dns:
            return None
        discovery = DnsDiscovery(
            DnsTarget.parse(settings.upstreams_dns),
            self.pool.set_members,
            interval=settings.upstreams_dns_interval,
            timeout=settings.connect_timeout,
        )
        self.pool.on_connect_error = discovery.connect_failed
        return discovery

    def request_id(self, given: str | None) -> str:
        """The client's ``X-Request-Id`` if it is sane, else a fresh one."""
        if given and len(given) <= 128 and given.isprintable():
            return given
        return f"{self._id_prefix}{next(self._ids):x}"

    def learn_models(self, models: list[dict[str, Any]]) -> None:
        """Model names an upstream lists become allowed metric labels."""
        for model in models:
            self.models.learn(model["id"])

    def record(
        self,
        *,
        rid: str,
        key: KeyState | None,
        model: str | None,
        mode: str | None,
        stream: bool,
        status: int,
        elapsed: float,
        upstream_wait: float = 0.0,
        outcome: Outcome | None = None,
        error: str | None = None,
    ) -> None:
        """Metrics and the access-log line for one finished request (``elapsed``: seconds
        from its arrival to its response). ``error`` is a reason code, never a message."""
        m = self.metrics
        label = self.models.label(model)
        requests, duration = m.request_children(
            label, "true" if stream else "false", mode or "none", str(status)
        )
        requests.inc()
        duration.observe(elapsed)
        m.overhead.observe(max(elapsed - upstream_wait, 0.0))
        row: dict[str, Any] = {
            "request_id": rid,
            "key": key.fingerprint if key else None,
            "model": model,
            "mode": mode,
            "stream": stream,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
        }
        if outcome is not None:
            m.tokens_prompt.inc(outcome.prompt_tokens)
            m.tokens_reasoning.inc(outcome.reasoning_tokens)
            m.tokens_answer.inc(outcome.answer_tokens)
            for kind in outcome.anomalies:
                m.think_anomalies.labels(kind).inc()
            if outcome.first_reasoning is not None:
                m.first_reasoning.labels(label).observe(outcome.first_reasoning)
            if outcome.first_answer is not None:
                m.first_answer.labels(label).observe(outcome.first_answer)
            row["prompt_tokens"] = outcome.prompt_tokens
            row["reasoning_tokens"] = outcome.reasoning_tokens
            row["answer_tokens"] = outcome.answer_tokens
            if outcome.anomalies:
                row["anomalies"] = outcome.anomalies
        if error:
            row["error"] = error
        self.access.write(row)
