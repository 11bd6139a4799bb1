"""Teacher endpoints as data (``teachers.yaml`` -> pydantic) and the pool that shares work.

Each endpoint has an adaptive concurrency limit (AIMD: halved once per window on a 429,
grown by one per full window of successes, so it recovers slowly up to ``max_concurrency``)
and optional requests/min and tokens/min limiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill_common.yamlfile import load_yaml_model

# Request fields generate sets itself; a teacher's extra_body must not change them.
RESERVED_FIELDS = frozenset(
    {"model", "messages", "seed", "stream", "stream_options", "temperature", "top_p", "max_tokens"}
)


class TeacherConfigError(ValueError):
    """A bad teachers file or a missing API-key variable (never the key itself)."""


class Price(BaseModel):
    """Price in currency units per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)


class TeacherSpec(BaseModel):
    """One OpenAI-compatible endpoint (one account/key)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    base_url: str
    model: str
    api_key_env: str | None = None
    max_concurrency: int = Field(16, ge=1)
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    price_per_million: Price | None = None
    # Provider-specific request fields, sent as they are in the JSON body (through the openai
    # SDK's extra_body): e.g. DeepSeek's thinking toggle, Bailian's enable_thinking and
    # thinking_budget, a local vLLM's chat_template_kwargs. Part of the ledger key.
    extra_body: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Stream this endpoint's answers whatever --stream says (models that only stream).
    stream: bool | None = None

    @field_validator("extra_body")
    @classmethod
    def _own_fields_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(set(v or {}) & RESERVED_FIELDS)
        if clash:
            raise ValueError(
                f"{clash} are set by distill generate itself (model, messages, sampling "
                f"flags); extra_body may add only other fields"
            )
        return v

    def request_options(self) -> dict[str, Any]:
        """The fields this endpoint adds to every request body."""
        out = dict(self.extra_body or {})
        if self.reasoning_effort is not None:
            out["reasoning_effort"] = self.reasoning_effort
        return out

    def api_key(self) -> str:
        """The key from the named environment variable ("EMPTY" when none is configured)."""
        if not self.api_key_env:
            return "EMPTY"
        key = os.environ.get(self.api_key_env)
        if not key:
            raise TeacherConfigError(
                f"teacher {self.name!r}: environment variable {self.api_key_env} is not set"
            )
        return key


class TeachersConfig(BaseModel):
    """``teachers.yaml``: the endpoints and, optionally, the model identity for the ledger."""

    model_config = ConfigDict(extra="forbid")

    teachers: list[TeacherSpec] = Field(min_length=1)
    ledger_model: str | None = None
    # The request options that identify answers in the ledger. Default: every endpoint's
    # extra_body and reasoning_effort. Set it (e.g. to {}) to declare endpoints whose options
    # are spelled differently but mean the same, so they share stored answers.
    ledger_options: dict[str, Any] | list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _names(self) -> TeachersConfig:
        for i, t in enumerate(self.teachers):
            if not t.name:
                t.name = f"teacher{i}"
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        return self

    @property
    def key_model(self) -> str:
        """The model name that goes into ledger keys (same for every endpoint of one model)."""
        if self.ledger_model:
            return self.ledger_model
        return "+".join(sorted({t.model for t in self.teachers}))

    @property
    def key_options(self) -> dict[str, Any] | list[dict[str, Any]] | None:
        """The request options that go into ledger keys: ``None`` when no endpoint sets any
        (keys are then exactly what they were before options existed), one endpoint's options,
        or the sorted list of each distinct set."""
        if self.ledger_options is not None:
            return self.ledger_options or None
        variants = sorted(
            {
                json.dumps(t.request_options(), sort_keys=True, ensure_ascii=False)
                for t in self.teachers
            }
        )
        if variants == ["{}"]:
            return None
        if len(variants) == 1:
            return json.loads(variants[0])
        return [json.loads(v) for v in variants]  # endpoints differ: every variant ({} = none)


def load_teachers(path: str | Path) -> TeachersConfig:
    """Load ``teachers.yaml`` (a mapping with a ``teachers`` list, or the bare list); errors
    name the file and the field."""
    return load_yaml_model(
        path,
        TeachersConfig,
        TeacherConfigError,
        what="teachers file",
        expected="a mapping with a 'teachers' list",
        prepare=lambda raw: {"teachers": raw} if isinstance(raw, list) else raw,
    )


class RateLimiter:
    """A token bucket refilled at ``per_minute / 60`` per second, one minute deep.

    :meth:`charge` may drive it negative (tokens counted after the response); :meth:`wait`
    then says how long until it is positive again.
    """

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, need: float = 1.0) -> float:
        """Seconds until ``need`` units are available (0 when they are now)."""
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def charge(self, amount: float) -> None:
        self._refill()
        self.level -= amount


@dataclass
class Endpoint:
    """One teacher endpoint's live state in the pool."""

    spec: TeacherSpec
    client: object = None  # the TeacherClient, attached by the runner
    limit: float = 0.0
    in_flight: int = 0
    epoch: int = 0
    rpm: RateLimiter | None = None
    tpm: RateLimiter | None = None
    throttled: int = 0
    attempts: int = 0

    def __post_init__(self) -> None:
        self.limit = float(self.spec.max_concurrency)
        self.rpm = RateLimiter(self.spec.rpm) if self.spec.rpm else None
        self.tpm = RateLimiter(self.spec.tpm) if self.spec.tpm else None

    @property
    def name(self) -> str:
        return self.spec.name

    def free(self) -> float:
        return int(self.limit) - self.in_flight

    def rate_wait(self) -> float:
        return max(self.rpm.wait() if self.rpm else 0.0, self.tpm.wait(0.0) if self.tpm else 0.0)


@dataclass
class Slot:
    """A granted request slot on one endpoint."""

    endpoint: Endpoint
    epoch: int
    throttled: bool = False
    tokens: int = 0


class EndpointPool:
    """Hands out request slots across endpoints, the least loaded first."""

    def __init__(self, specs: list[TeacherSpec], *, global_limit: int | None = None):
        self.endpoints = [Endpoint(s) for s in specs]
        self.global_limit = global_limit
        self._cond = asyncio.Condition()

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self.endpoints)

    @property
    def capacity(self) -> int:
        total = sum(e.spec.max_concurrency for e in self.endpoints)
        return min(total, self.global_limit) if self.global_limit else total

    def _pick(self) -> tuple[Endpoint | None, float]:
        if self.global_limit and self.in_flight >= self.global_limit:
            return None, 0.0
        best, best_free, soonest = None, 0.0, float("inf")
        for ep in self.endpoints:
            free = ep.free()
            if free <= 0:
                continue
            wait = ep.rate_wait()
            if wait > 0:
                soonest = min(soonest, wait)
                continue
            share = free / ep.limit
            if share > best_free:
                best, best_free = ep, share
        return best, (0.0 if soonest == float("inf") else soonest)

    async def acquire(self) -> Slot:
        """Wait for a free slot on some endpoint."""
        async with self._cond:
            while True:
                ep, wait = self._pick()
                if ep is not None:
                    ep.in_flight += 1
                    ep.attempts += 1
                    if ep.rpm:
                        ep.rpm.charge(1)
                    return Slot(ep, ep.epoch)
                if wait:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), wait)
                else:
                    await self._cond.wait()

    async def release(self, slot: Slot, *, throttled: bool = False, tokens: int = 0) -> None:
        """Return a slot; ``throttled`` (a 429) halves the endpoint's limit once per window."""
        ep = slot.endpoint
        ep.in_flight -= 1
        if throttled:
            ep.throttled += 1
            if slot.epoch == ep.epoch:
                ep.limit = max(1.0, ep.limit / 2)
                ep.epoch += 1
        else:
            ep.limit = min(float(ep.spec.max_concurrency), ep.limit + 1.0 / ep.limit)
        if ep.tpm and tokens:
            ep.tpm.charge(tokens)
        async with self._cond:
            self._cond.notify(2)  # one freed slot, maybe one more if the limit grew

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """``async with pool.slot() as s`` — released as a success unless marked otherwise."""
        s = await self.acquire()
        try:
            yield s
        finally:
            await self.release(s, throttled=s.throttled, tokens=s.tokens)
