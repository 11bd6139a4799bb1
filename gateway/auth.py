"""Bearer keys and per-key limits (requests per minute, requests at once)."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.protocol import GatewayError
from gateway.settings import Settings


class KeysFileError(ValueError):
    """A keys file line that cannot be read; the message names file and line."""


@dataclass
class KeyState:
    """One API key's limits and live counters. ``fingerprint`` is what logs may show."""

    fingerprint: str
    rpm: int | None = None
    concurrency: int | None = None
    in_flight: int = 0
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = float(self.rpm or 0)

    def take(self, now: float) -> None:
        """Admit one request or raise 429 with Retry-After (token bucket, burst = rpm)."""
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            raise GatewayError(
                429,
                f"too many requests at once for this key (limit {self.concurrency})",
                code="concurrency_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        if self.rpm is not None:
            rate = self.rpm / 60.0
            self.tokens = min(float(self.rpm), self.tokens + (now - self.updated) * rate)
            self.updated = now
            if self.tokens < 1.0:
                wait = max(1, math.ceil((1.0 - self.tokens) / rate))
                raise GatewayError(
                    429,
                    f"rate limit of {self.rpm} requests per minute reached for this key",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
            self.tokens -= 1.0
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


def fingerprint(key: str) -> str:
    """A short, non-reversible name for a key (safe for logs)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _parse_limit(path: Path, lineno: int, item: str) -> tuple[str, int]:
    name, sep, value = item.partition("=")
    if not sep or name not in ("rpm", "concurrency") or not value.isdigit() or int(value) < 1:
        raise KeysFileError(
            f"{path}:{lineno}: expected `KEY [rpm=N] [concurrency=N]` with N >= 1, got {item!r}"
        )
    return name, int(value)


def load_keys(settings: Settings) -> dict[str, KeyState]:
    """Keys from ``GATEWAY_API_KEYS`` and ``GATEWAY_API_KEYS_FILE``; empty means no auth."""
    keys: dict[str, KeyState] = {}

    def add(key: str, rpm: int | None, concurrency: int | None) -> None:
        keys[key] = KeyState(fingerprint(key), rpm=rpm, concurrency=concurrency)

    for key in settings.api_keys:
        add(key, settings.rate_limit_rpm, settings.max_concurrent_per_key)
    path = settings.api_keys_file
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise KeysFileError(f"{path}: cannot read the API keys file ({e.strerror})") from None
        for lineno, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            limits = dict(_parse_limit(path, lineno, w) for w in words[1:])
            add(
                words[0],
                limits.get("rpm", settings.rate_limit_rpm),
                limits.get("concurrency", settings.max_concurrent_per_key),
            )
    return keys


class Authenticator:
    """Checks ``Authorization: Bearer KEY`` against the configured keys."""

    def __init__(self, keys: dict[str, KeyState]) -> None:
        self.keys = keys
        self.enabled = bool(keys)
        self._anonymous = KeyState("anonymous")

    def check(self, authorization: str | None) -> KeyState:
        """The caller's key state, or raise 401 (the message never echoes the key)."""
        if not self.enabled:
            return self._anonymous
        if not authorization:
            raise GatewayError(
                401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key"
            )
        scheme, _, key = authorization.partition(" ")
        state = self.keys.get(key.strip()) if scheme.lower() == "bearer" else None
        if state is None:
            raise GatewayError(401, "invalid API key", code="invalid_api_key")
        return state


class RequireKey:
    """ASGI middleware: every ``/v1`` request needs a valid key (else 401, reported to
    ``rejected`` with the seconds it took); the key's state goes to ``scope["state"]["key"]``."""

    def __init__(
        self, app: ASGIApp, auth: Authenticator, rejected: Callable[[GatewayError, float], None]
    ) -> None:
        self.app = app
        self.auth = auth
        self.rejected = rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            t0 = time.perf_counter()
            authorization = Headers(scope=scope).get("authorization")
            try:
                key = self.auth.check(authorization)
            except GatewayError as err:
                response = Response(
                    err.body(), status_code=err.status, media_type="application/json"
                )
                await response(scope, receive, send)
                self.rejected(err, time.perf_counter() - t0)
                return
            scope.setdefault("state", {})["key"] = key
        await self.app(scope, receive, send)
