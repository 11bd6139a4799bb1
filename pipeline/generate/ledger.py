"""The request ledger: every teacher response, committed to SQLite (WAL) before it is parsed.

A request is identified by :func:`request_key` — a hash of the normalised messages, the model,
the sampling parameters and the sample index — so a re-run finds every answer it already paid
for, whatever endpoint served it, and a changed parser or filter needs no new requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key               TEXT PRIMARY KEY,
    row_id            TEXT NOT NULL,
    sample            INTEGER NOT NULL,
    status            TEXT NOT NULL,      -- 'ok': a response arrived; 'failed': retries ran out
    response          TEXT NOT NULL,      -- JSON: content, reasoning fields, finish_reason, usage
    endpoint          TEXT,
    attempts          INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    reasoning_tokens  INTEGER,
    created_at        REAL NOT NULL
);
"""


def request_key(
    messages: list[dict[str, str]],
    model: str,
    params: dict[str, Any],
    sample: int,
    options: Any = None,
) -> str:
    """sha256 of (normalised messages, model, sampling params, sample index[, options]).

    ``options`` (the teachers' request options, e.g. a thinking toggle) join the key only
    when there are some, so the keys of teachers without any never change and an existing
    ledger keeps answering them.
    """
    norm = [
        {"role": m["role"], "content": unicodedata.normalize("NFC", m["content"]).strip()}
        for m in messages
    ]
    ident: dict[str, Any] = {"messages": norm, "model": model, "params": params, "sample": sample}
    if options:
        ident["options"] = options
    blob = json.dumps(
        ident,
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Stored:
    """One ledger row."""

    key: str
    row_id: str
    sample: int
    status: str
    response: dict[str, Any]
    endpoint: str | None
    attempts: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Ledger:
    """A small SQLite store; each :meth:`put` is its own committed transaction.

    Several processes may hold it open at once (WAL: readers never block, writers queue).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Paid-for answers stay private whatever the umask (SQLite gives its -wal and -shm
        # files the database file's mode).
        os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        os.chmod(self.path, 0o600)
        self.db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=60.0
        )  # worker processes share the file: a writer waits (busy timeout) for another's commit
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a killed process (only an OS crash can lose the tail).
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def load(self) -> dict[str, Stored]:
        """Every stored row, by key."""
        cur = self.db.execute(
            "SELECT key, row_id, sample, status, response, endpoint, attempts FROM responses"
        )
        return {
            r[0]: Stored(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6])
            for r in cur.fetchall()
        }

    def put(
        self,
        key: str,
        *,
        row_id: str,
        sample: int,
        status: str,
        response: dict[str, Any],
        endpoint: str | None,
        attempts: int,
    ) -> Stored:
        """Store (or replace a failed) response and commit it."""
        usage = response.get("usage") or {}
        self.db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                key,
                row_id,
                sample,
                status,
                json.dumps(response, ensure_ascii=False),
                endpoint,
                attempts,
                usage.get("prompt_tokens"),
                usage.get("completion_tokens"),
                usage.get("reasoning_tokens"),
                time.time(),
            ),
        )
        return Stored(key, row_id, sample, status, response, endpoint, attempts)

    def close(self) -> None:
        self.db.close()
