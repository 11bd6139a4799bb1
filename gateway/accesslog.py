"""The access log: one JSON line per request, written with one ``os.write`` (no logging
machinery on the hot path). Keys never appear, only their fingerprints."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

import orjson


class AccessLog:
    """``target``: ``-`` for stdout, empty for off, otherwise a file path (appended)."""

    def __init__(self, target: str) -> None:
        self._owned = False
        if not target:
            self.fd = None
        elif target == "-":
            self.fd = sys.stdout.fileno()
        else:
            self.fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._owned = True

    def write(self, row: dict[str, Any]) -> None:
        if self.fd is None:
            return
        row["ts"] = round(time.time(), 3)
        with contextlib.suppress(OSError):  # a full disk must not fail requests
            os.write(self.fd, orjson.dumps(row) + b"\n")

    def close(self) -> None:
        if self._owned and self.fd is not None:
            os.close(self.fd)
            self.fd = None
