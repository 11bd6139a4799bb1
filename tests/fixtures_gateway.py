"""Gateway fixtures: the gateway in the server the image runs, on a free port (real HTTP, in
a thread), and stand-in upstreams that live for a whole test module.

Usage::

    def test_x(gateway, standin_inline):
        gw = gateway(upstreams=standin_inline.base_url, think="hide")
        client = openai.OpenAI(base_url=gw.base_url, api_key="x")
"""

from __future__ import annotations

import gc
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import ROOT, free_port

if TYPE_CHECKING:
    from tests.fixtures_standin import StandinServer


def access_rows(path: Path) -> list[dict]:
    """The gateway's access log, one dict a row (none before the first request)."""
    import orjson

    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@dataclass
class GatewayServer:
    """A gateway running in this process: its URLs, settings and access log."""

    base_url: str  # http://127.0.0.1:P/v1
    root_url: str  # http://127.0.0.1:P
    access_log: Path
    settings: object
    server: object = field(repr=False)
    thread: threading.Thread = field(repr=False)

    def metrics(self) -> str:
        return httpx.get(self.root_url + "/metrics", timeout=10).text

    def log_rows(self) -> list[dict]:
        return access_rows(self.access_log)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        gc.unfreeze()  # the test session's objects may be collected again


def start_gateway(tmp_dir: Path, **overrides: object) -> GatewayServer:
    """Start ``create_app(Settings(**overrides))`` on a free port, in the server
    ``distill-gateway`` runs (:func:`gateway.server.build_server`)."""
    from gateway.app import create_app
    from gateway.server import build_server, freeze_heap
    from gateway.settings import Settings

    port = free_port()
    log = tmp_dir / f"gateway-{port}.jsonl"
    settings = Settings(**{"access_log": str(log), "host": "127.0.0.1", "port": port, **overrides})
    app = create_app(settings)
    server = build_server(settings, app)
    freeze_heap()  # as distill-gateway does; here the heap is the whole test session's
    thread = threading.Thread(target=server.run, daemon=True, name=f"gateway-{port}")
    thread.start()
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"gateway on port {port} did not start")
        time.sleep(0.01)
    return GatewayServer(root + "/v1", root, log, settings, server, thread)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayServer]]:
    """Factory: ``gateway(**settings) -> GatewayServer``; stopped at teardown."""
    servers: list[GatewayServer] = []

    def start(**overrides: object) -> GatewayServer:
        server = start_gateway(tmp_path, **overrides)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@dataclass
class GatewayProcess:
    """A gateway running as ``python -m gateway`` (its image's command) in its own process."""

    base_url: str
    root_url: str
    access_log: Path

    def metrics(self) -> str:
        return httpx.get(self.root_url + "/metrics", timeout=10).text

    def log_rows(self) -> list[dict]:
        return access_rows(self.access_log)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """Factory: ``gateway_process(upstream, **env) -> GatewayProcess`` (``env``: more
    ``GATEWAY_*`` settings); stopped at teardown. For tests that time the gateway against a
    generation: in its own process it shares no interpreter with the test session."""
    from pipeline.serve import running_gateway

    with ExitStack() as stack:

        def start(upstream: str, **env: str) -> GatewayProcess:
            port = free_port()
            log = tmp_path / f"gateway-{port}.log"
            base = stack.enter_context(running_gateway(upstream, {}, port, log, env))
            return GatewayProcess(base, base.removesuffix("/v1"), log.with_suffix(".access.jsonl"))

        yield start


def launch_standin(tmp_dir: Path, **options: object) -> StandinServer:
    """Start a stand-in teacher process (same command line as the ``standin`` fixture)."""
    from tests.fixtures_standin import DEFAULT_MODEL, StandinServer, _argv

    port = free_port()
    log = tmp_dir / f"standin-{port}.jsonl"
    stderr_path = tmp_dir / f"standin-{port}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(
            _argv(port, log, options), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
        )
    return StandinServer(
        base_url=f"http://127.0.0.1:{port}/v1",
        model=str(options.get("model") or DEFAULT_MODEL),
        request_log=log,
        port=port,
        process=proc,
        stderr_path=stderr_path,
    )


def wait_healthy(server: StandinServer, timeout: float = 20) -> StandinServer:
    """Poll the stand-in's /health until it answers (or fail with its stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"stand-in exited: {server.stderr_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"stand-in on port {server.port} not healthy in time")
        time.sleep(0.05)


def start_standin(tmp_dir: Path, **options: object) -> StandinServer:
    return wait_healthy(launch_standin(tmp_dir, **options))


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, StandinServer]]:
    """One stand-in per reasoning format, shared by a test module (started in parallel)."""
    tmp = tmp_path_factory.mktemp("standins")
    formats = ["inline", "inline-no-open", "reasoning_content", "reasoning"]
    servers: dict[str, StandinServer] = {}
    try:
        for fmt in formats:
            servers[fmt] = launch_standin(tmp, reasoning_format=fmt)
        for server in servers.values():
            wait_healthy(server)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def standin_factory(tmp_path: Path) -> Iterator[Callable[..., StandinServer]]:
    """Factory for stand-ins with special options (latency, chunk delay), per test."""
    servers: list[StandinServer] = []

    def start(**options: object) -> StandinServer:
        server = start_standin(tmp_path, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@contextmanager
def connect_hangs() -> Iterator[str]:
    """The base URL of an address whose TCP connect hangs: a listener that never accepts,
    its accept queue (backlog 0 holds one connection) filled first, so the kernel drops
    every further SYN and the connecting side keeps retrying."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    probe = socket.socket()
    probe.settimeout(0.2)
    try:
        with pytest.raises(TimeoutError):  # the trick works on this kernel
            probe.connect(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for sock in (probe, filler, listener):
            sock.close()
