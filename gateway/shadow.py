"""Shadow traffic: a sample of answered requests is asked again of the teacher, in the background.

The student's label and the teacher's are read with the task's answer rule
(:mod:`distill_common.task`) and counted in ``gateway_shadow_total{model,outcome}``;
disagreements (and, optionally, a sample of agreements) go to the flywheel JSONL
(:mod:`gateway.flywheel`), in the input format ``distill generate --input`` reads, with the
teacher's raw answer under ``shadow`` so ``distill generate --import-shadow`` can put it into
the request ledger.

The request path only calls :meth:`Shadow.wants` and :meth:`Shadow.submit`; neither waits nor
raises. Work is bounded three ways: queue length (a full queue drops the call, counted as
``dropped``), requests per minute to the teacher, and teacher calls in flight (one worker each).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from distill_common.task import Task
from gateway.flywheel import Flywheel, answer_text, fields_of, raw_answer, stream_text
from gateway.tasks import TaskRegistry

log = logging.getLogger("gateway.shadow")

OUTCOMES = ("agree", "disagree", "student_invalid", "teacher_invalid", "teacher_error", "dropped")


class TeacherRef(BaseModel):
    """Where the shadow teacher is: ``url=…/v1,model=NAME[,key_env=VAR]``."""

    url: str
    model: str
    key_env: str | None = None

    @classmethod
    def parse(cls, text: str) -> TeacherRef:
        parts: dict[str, str] = {}
        for item in (p.strip() for p in text.split(",")):
            name, sep, value = (x.strip() for x in item.partition("="))
            if not item:
                continue
            if not sep or name not in {"url", "model", "key_env"} or not value:
                raise ValueError(
                    f"GATEWAY_SHADOW_TEACHER: {item!r} is not url=…, model=… or key_env=…"
                )
            parts[name] = value
        if "url" not in parts or "model" not in parts:
            raise ValueError("GATEWAY_SHADOW_TEACHER needs url=<base URL …/v1> and model=<name>")
        if not parts["url"].startswith(("http://", "https://")):
            raise ValueError(f"GATEWAY_SHADOW_TEACHER url {parts['url']!r} is not http(s)")
        return cls(**parts)

    def api_key(self) -> str | None:
        if not self.key_env:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            raise ValueError(f"GATEWAY_SHADOW_TEACHER key_env={self.key_env}: variable is unset")
        return key


class ShadowSettings(BaseSettings):
    """``GATEWAY_SHADOW_*``: off unless a teacher is named and the rate is above 0."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_SHADOW_", extra="ignore")

    teacher: str = Field("", description="`url=…/v1,model=NAME,key_env=VAR`; empty: off.")
    rate: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of task requests shadowed.")
    max_rpm: float = Field(60.0, gt=0, description="Teacher requests per minute, at most.")
    max_in_flight: int = Field(4, ge=1, description="Teacher requests at once, at most.")
    queue: int = Field(256, ge=1, description="Waiting shadow calls; beyond it they are dropped.")
    timeout: float = Field(600.0, gt=0, description="Seconds per teacher call.")
    # The sampling parameters default to `distill generate`'s, so imported answers key alike.
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 8192
    log: Path | None = Field(None, description="Flywheel JSONL (user inputs!); unset: off.")
    log_agreements: float = Field(0.0, ge=0.0, le=1.0, description="Share of agreements logged.")
    log_max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate at this size.")
    log_backups: int = Field(5, ge=1, description="Rotated files kept (.1 … .N).")

    @field_validator("log", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def enabled(self) -> bool:
        return bool(self.teacher.strip()) and self.rate > 0

    @property
    def params(self) -> dict[str, Any]:
        """Sampling parameters: the same names and values ``distill generate`` keys by."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter(
            "gateway_shadow",
            "Shadowed requests by model and outcome (student vs teacher label).",
            ["model", "outcome"],
            registry=registry,
        )
        self.by_label = Counter(
            "gateway_shadow_label",
            "Shadowed requests with both labels valid, by the teacher's label and agreement.",
            ["model", "label", "outcome"],
            registry=registry,
        )
        self.queued = Gauge("gateway_shadow_queued", "Shadow calls waiting.", registry=registry)
        self.flywheel = Counter(
            "gateway_shadow_flywheel_rows", "Rows written to the flywheel JSONL.", registry=registry
        )


class RateLimiter:
    """Token bucket: ``per_minute`` calls, bursts of at most ``max(1, per_minute/60)``."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.cap = max(1.0, self.rate)
        self.tokens = self.cap
        self.t = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.cap, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class Shadow:
    """The background shadow: started and stopped with the app; :meth:`submit` per reply."""

    def __init__(
        self, settings: ShadowSettings, tasks: TaskRegistry, registry: CollectorRegistry
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.metrics = ShadowMetrics(registry)
        self.enabled = settings.enabled and len(tasks) > 0
        self.teacher = TeacherRef.parse(settings.teacher) if settings.enabled else None
        self._key = self.teacher.api_key() if self.teacher else None
        self.flywheel = (
            Flywheel(settings.log, settings.log_max_bytes, settings.log_backups)
            if settings.log and self.enabled
            else None
        )
        if self.enabled:  # every series exists from the start (0), so rates and alerts see it
            for model in tasks:
                for outcome in OUTCOMES:
                    self.metrics.total.labels(model, outcome)
                for label in tasks.get(model).labels:
                    self.metrics.by_label.labels(model, label, "agree")
                    self.metrics.by_label.labels(model, label, "disagree")
        self.queue: asyncio.Queue | None = None
        self._workers: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._limiter = RateLimiter(settings.max_rpm)

    # -- request path (never waits, never raises) ---------------------------------------------
    def wants(self, model: str | None) -> bool:
        """Should this reply be shadowed? (sampled, and the model has a task)."""
        if not (self.enabled and self.queue is not None and model in self.tasks):
            return False
        if random.random() >= self.settings.rate:
            return False
        if self.queue.full():  # count the drop now: the reply need not be kept for it
            self.metrics.total.labels(model, "dropped").inc()
            return False
        return True

    def submit(
        self, model: str, messages: list[dict[str, Any]], student: str | list[bytes]
    ) -> None:
        """Queue one shadow call; ``student`` is the reply's text, or a stream's raw SSE pieces."""
        try:
            assert self.queue is not None
            self.queue.put_nowait((model, messages, student))
            self.metrics.queued.inc()
        except asyncio.QueueFull:
            self.metrics.total.labels(model, "dropped").inc()
        except Exception:  # a shadow problem must never reach the client's request
            log.exception("shadow submit failed")

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled:
            return
        s = self.settings
        self.queue = asyncio.Queue(maxsize=s.queue)
        headers = {"authorization": f"Bearer {self._key}"} if self._key else {}
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=s.timeout, connect=min(s.timeout, 30.0)),
            connector=aiohttp.TCPConnector(limit=s.max_in_flight),
        )
        self._workers = [asyncio.create_task(self._work()) for _ in range(s.max_in_flight)]

    async def stop(self) -> None:
        """Cancel what is queued or in flight (shadow calls are best effort) and close."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.queue = None

    # -- background work ----------------------------------------------------------------------
    async def _work(self) -> None:
        assert self.queue is not None
        queue = self.queue
        while True:
            model, messages, student = await queue.get()
            self.metrics.queued.dec()
            try:
                await self._limiter.take()
                await self.shadow_one(model, messages, student)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shadow call failed")

    async def ask_teacher(self, messages: list[dict[str, str]]) -> dict[str, Any] | None:
        """The teacher's raw answer, or ``None`` on any failure (no retries: best effort)."""
        assert self.teacher is not None and self._session is not None
        # seed 0: the very request `distill generate` sends for sample 0 of this input
        body = {"model": self.teacher.model, "messages": messages, "seed": 0, "stream": False}
        body.update(self.settings.params)
        url = self.teacher.url.rstrip("/") + "/chat/completions"
        try:
            async with self._session.post(url, data=orjson.dumps(body)) as resp:
                if resp.status != 200:
                    return None
                return raw_answer(orjson.loads(await resp.read()))
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
            return None

    async def shadow_one(
        self, model: str, messages: list[dict[str, Any]], student: str | list[bytes]
    ) -> str | None:
        """Ask the teacher, count the outcome, write the flywheel row; returns the outcome."""
        task = self.tasks.get(model)
        if task is None:
            return None
        student_text = student if isinstance(student, str) else stream_text(b"".join(student))
        convo = [m for m in messages if m.get("role") != "system"]
        if not convo or not all(isinstance(m.get("content"), str) for m in convo):
            return None  # multimodal parts and the like: not a task input
        teacher_messages = [{"role": "system", "content": task.system_prompt}] + [
            {"role": m["role"], "content": m["content"]} for m in convo
        ]
        raw = await self.ask_teacher(teacher_messages)
        s_label = task.label_of(student_text)
        t_label = task.label_of(answer_text(raw)) if raw is not None else None
        if raw is None:
            outcome = "teacher_error"
        elif t_label is None:
            outcome = "teacher_invalid"
        elif s_label is None:
            outcome = "student_invalid"
        else:
            outcome = "agree" if s_label == t_label else "disagree"
            self.metrics.by_label.labels(model, t_label, outcome).inc()
        self.metrics.total.labels(model, outcome).inc()
        logged = outcome != "agree" or random.random() < self.settings.log_agreements
        if raw is not None and self.flywheel is not None and len(convo) == 1 and logged:
            self._log(task, model, convo[0]["content"], raw, s_label, t_label, outcome)
        return outcome

    def _log(
        self,
        task: Task,
        model: str,
        user_text: str,
        raw: dict[str, Any],
        s_label: str | None,
        t_label: str | None,
        outcome: str,
    ) -> None:
        row = fields_of(task, user_text)
        if row is None or self.flywheel is None or self.teacher is None:
            return  # the user message is not this task's template: not a generate input
        row["shadow"] = {
            "teacher_model": self.teacher.model,
            "params": self.settings.params,
            "response": raw,
            "student_model": model,
            "student_label": s_label,
            "teacher_label": t_label,
            "outcome": outcome,
            "time": round(time.time(), 3),
        }
        try:
            self.flywheel.write(row)
            self.metrics.flywheel.inc()
        except OSError as exc:
            log.warning("flywheel %s: %s", self.flywheel.path, exc.strerror)
