"""Fault injection for the stand-in: parse a rate SPEC, draw faults deterministically.

SPEC: ``429=0.2,500=0.05,empty=0.05,keepalive=0.1,truncate=0.05,offlabel=0.05,broken=0.02,
retry_after=1``. Two independent draws per request:

* transport faults (``429``, ``500``, ``empty``, ``keepalive``) are drawn from
  hash(seed, request key, attempt), so the Nth arrival of the same request gets its own
  reproducible draw and a retry can succeed;
* content faults (``truncate``, ``offlabel``, ``broken``) are drawn from hash(seed, request
  key) only: a given request always gets the same text, so a client that resumes after a crash
  (and re-sends a request whose answer it never received) sees what an uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import orjson

TRANSPORT = ("429", "500", "empty", "keepalive")
CONTENT = ("truncate", "offlabel", "broken")


class FaultSpecError(ValueError):
    """A fault SPEC that cannot be parsed; the message says what was expected."""


def request_key(body: dict) -> str:
    """Stable key of a chat request: sha256 of its canonical JSON minus ``stream`` and
    ``stream_options`` (orjson, keys sorted), first 16 hex characters."""
    rest = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return hashlib.sha256(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _unit(*parts: object) -> float:
    """A uniform draw in [0, 1) determined by the parts."""
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") / 2.0**64


@dataclass(frozen=True)
class FaultPlan:
    """Fault rates and the seed that makes their draws reproducible."""

    rates: dict[str, float] = field(default_factory=dict)
    retry_after: float = 1.0
    seed: int = 0

    @classmethod
    def parse(cls, spec: str | None, seed: int = 0) -> FaultPlan:
        """Parse ``kind=rate,...``; unknown kinds, bad numbers and rates summing over 1 fail."""
        rates: dict[str, float] = {}
        retry_after = 1.0
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip()
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not sep or number != number:
                raise FaultSpecError(
                    f"fault '{item}': expected NAME=NUMBER, e.g. 429=0.2 or retry_after=1"
                )
            if name == "retry_after":
                if number < 0:
                    raise FaultSpecError("retry_after must be >= 0 seconds")
                retry_after = number
                continue
            if name not in TRANSPORT + CONTENT:
                raise FaultSpecError(
                    f"unknown fault '{name}'; expected one of {', '.join(TRANSPORT + CONTENT)}"
                    " or retry_after"
                )
            if not 0 <= number <= 1:
                raise FaultSpecError(f"fault '{name}': rate {number} is not in [0, 1]")
            rates[name] = number
        for group, names in (("transport", TRANSPORT), ("content", CONTENT)):
            total = sum(rates.get(n, 0.0) for n in names)
            if total > 1 + 1e-9:
                raise FaultSpecError(
                    f"{group} fault rates ({', '.join(names)}) sum to {total:g}, more than 1"
                )
        return cls(rates=rates, retry_after=retry_after, seed=seed)

    def _draw(self, names: tuple[str, ...], u: float) -> str | None:
        edge = 0.0
        for name in names:
            edge += self.rates.get(name, 0.0)
            if u < edge:
                return name
        return None

    def transport(self, key: str, attempt: int) -> str | None:
        """The transport fault of the ``attempt``-th arrival of request ``key`` (or None)."""
        if not any(self.rates.get(n) for n in TRANSPORT):
            return None
        return self._draw(TRANSPORT, _unit("transport", self.seed, key, attempt))

    def content(self, key: str) -> str | None:
        """The content fault of request ``key`` (or None); the same for every attempt."""
        if not any(self.rates.get(n) for n in CONTENT):
            return None
        return self._draw(CONTENT, _unit("content", self.seed, key))

    def variant(self, key: str, name: str, n: int) -> int:
        """A deterministic choice among ``n`` ways to apply fault ``name`` to request ``key``."""
        return int(_unit(name, self.seed, key) * n)
