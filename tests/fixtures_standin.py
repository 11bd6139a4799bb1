"""The ``standin`` fixture: start the stand-in teacher as its own process, on a free port.

Usage::

    def test_x(standin):
        srv = standin(faults="429=0.2", latency_ms=0, reasoning_format="inline")
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")
        client.chat.completions.create(model=srv.model, messages=[...])
        rows = srv.requests()          # one dict per request the server received

Keyword arguments become command-line options (``latency_ms=5`` -> ``--latency-ms 5``);
``extra_args=[...]`` passes anything else verbatim.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import ROOT, free_port

DEFAULT_MODEL = "deepseek-r1-standin"
STARTUP_TIMEOUT_S = 20.0


@dataclass
class StandinServer:
    """A running stand-in: where it listens, which model it serves, where it logs."""

    base_url: str
    model: str
    request_log: Path
    port: int
    process: subprocess.Popen = field(repr=False)
    stderr_path: Path = field(repr=False)

    def requests(self) -> list[dict]:
        """Rows of the request log so far (a torn last line, if any, is skipped)."""
        if not self.request_log.exists():
            return []
        rows = []
        for line in self.request_log.read_bytes().splitlines():
            try:
                rows.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return rows

    def stop(self) -> None:
        """Stop the server process (SIGTERM, then SIGKILL if it lingers)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _argv(port: int, log: Path, options: dict) -> list[str]:
    argv = [sys.executable, "-m", "pipeline.standin", "--port", str(port)]
    argv += ["--request-log", str(log)]
    for name, value in options.items():
        if value is None:
            continue
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Callable[..., StandinServer]]:
    """Factory: ``standin(**options) -> StandinServer``; every server is killed at teardown."""
    servers: list[StandinServer] = []

    def start(*, extra_args: list[str] | None = None, **options: object) -> StandinServer:
        port = free_port()
        log = Path(str(options.pop("request_log", tmp_path / f"standin-{port}.jsonl")))
        model = str(options.get("model") or DEFAULT_MODEL)
        stderr_path = tmp_path / f"standin-{port}.stderr"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen(
                _argv(port, log, options) + list(extra_args or []),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        server = StandinServer(
            base_url=f"http://127.0.0.1:{port}/v1",
            model=model,
            request_log=log,
            port=port,
            process=proc,
            stderr_path=stderr_path,
        )
        servers.append(server)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"stand-in exited with {proc.returncode}: "
                    f"{stderr_path.read_text(errors='replace')[-2000:]}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"stand-in on port {port} not healthy in {STARTUP_TIMEOUT_S}s")
            time.sleep(0.05)

    yield start
    for server in servers:
        server.stop()
