"""Prometheus metrics (names agreed in DESIGN.md), with bounded labels only."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

OTHER = "other"
MAX_MODELS = 32

# LLM requests take from tens of milliseconds (a short answer) to minutes (long reasoning).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class KnownModels:
    """Model names allowed as label values: configured ones plus those an upstream served
    (capped at ``MAX_MODELS``); anything else is ``other``."""

    def __init__(self, names: list[str]) -> None:
        self.names: set[str] = set(names[:MAX_MODELS])

    def learn(self, name: str) -> None:
        if name not in self.names and len(self.names) < MAX_MODELS:
            self.names.add(name)

    def label(self, name: str | None) -> str:
        return name if name in self.names else OTHER


class Metrics:
    """All gateway metrics in their own registry (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        p = "gateway_"
        self.requests = Counter(
            p + "requests",
            "Chat requests answered, by model, streaming, think mode and HTTP status.",
            ["model", "stream", "think", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["model", "stream"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.first_reasoning = Histogram(
            p + "time_to_first_reasoning_token_seconds",
            "Time from request to the first reasoning text (streaming).",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.first_answer = Histogram(
            p + "time_to_first_answer_token_seconds",
            "Time from request to the first answer text (streaming).",
            ["model"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            p + "tokens",
            "Tokens by kind: prompt, reasoning, answer. Reasoning and answer are exact only "
            "with GATEWAY_TOKENIZER (gateway_token_counts_exact 1), otherwise estimated.",
            ["kind"],
            registry=registry,
        )
        self.token_counts_exact = Gauge(
            p + "token_counts_exact",
            "1 when reasoning/answer token counts are exact (GATEWAY_TOKENIZER loaded), else 0.",
            registry=registry,
        )
        self.in_flight = Gauge(
            p + "in_flight_requests", "Chat requests being answered now.", registry=registry
        )
        # The request path counts in a plain int (one event loop, no lock per request);
        # the gauge reads it at scrape time.
        self.in_flight_now = 0
        self.in_flight.set_function(lambda: self.in_flight_now)
        self.upstream_errors = Counter(
            p + "upstream_errors",
            "Upstream failures by reason.",
            ["reason"],
            registry=registry,
        )
        self.think_anomalies = Counter(
            p + "think_anomalies",
            "Responses whose think section was malformed (unclosed, stray_tag).",
            ["kind"],
            registry=registry,
        )
        self.overhead = Histogram(
            p + "overhead_seconds",
            "Time spent in the gateway: total minus time waiting on the upstream.",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self._children: dict[tuple, tuple] = {}
        self.tokens_prompt = self.tokens.labels("prompt")
        self.tokens_reasoning = self.tokens.labels("reasoning")
        self.tokens_answer = self.tokens.labels("answer")
        for kind in ("unclosed", "stray_tag"):
            self.think_anomalies.labels(kind)
        for reason in UPSTREAM_ERROR_REASONS:
            self.upstream_errors.labels(reason)

    def request_children(self, model: str, stream: str, think: str, status: str) -> tuple:
        """(requests counter, duration histogram) children for these labels, cached."""
        key = (model, stream, think, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(model, stream, think, status),
                self.duration.labels(model, stream),
            )
        return children

    def set_token_counts_exact(self, exact: bool) -> None:
        """Say whether the reasoning/answer token counts are exact (a tokenizer is loaded)."""
        self.token_counts_exact.set(1 if exact else 0)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


UPSTREAM_ERROR_REASONS = (
    "connect",
    "connect_timeout",
    "first_byte_timeout",
    "total_timeout",
    "closed",
    "status_4xx",
    "status_5xx",
    "bad_response",
)
