"""GATEWAY_UPSTREAMS_DNS: the upstream pool follows a DNS name (a Kubernetes headless Service).

The end-to-end tests run real stand-in servers on several loopback addresses (127.0.0.2, .3,
.4) on one port, as the pods behind a headless Service are, and the gateway in this process;
the only stand-in is the DNS answer, which the test controls.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.discovery import DnsDiscovery, DnsTarget
from tests.conftest import ROOT, free_port
from tests.fixtures_standin import StandinServer, _argv

MODEL = "student"


class FakeDNS:
    """A resolver whose answer the test sets; counts the lookups."""

    def __init__(self, *addresses: str) -> None:
        self.answer: list[str] | BaseException = list(addresses)
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return list(self.answer)


# ---- target parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("vllm-headless.ns.svc:8000", "http://10.0.0.7:8000/v1"),
        ("vllm-headless:8000", "http://10.0.0.7:8000/v1"),
        ("http://vllm-headless:8000/v1", "http://10.0.0.7:8000/v1"),
        ("https://vllm-headless:8443/openai/v1/", "https://10.0.0.7:8443/openai/v1"),
    ],
)
def test_target_forms(text, url):
    assert DnsTarget.parse(text).url("10.0.0.7") == url


def test_ipv6_addresses_are_bracketed():
    assert DnsTarget.parse("svc:8000").url("fd00::7") == "http://[fd00::7]:8000/v1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vllm-headless", "is not host:port"),
        ("vllm-headless:http", "is not host:port"),
        ("ftp://vllm:8000", "scheme must be http or https"),
        ("http://u:p@vllm:8000/v1", "only scheme, host, port and path"),
    ],
)
def test_bad_targets_are_refused_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        DnsTarget.parse(text)


# ---- refresh semantics ---------------------------------------------------------------------


def discovery(dns: FakeDNS, **kw: float) -> tuple[DnsDiscovery, list[list[str]]]:
    calls: list[list[str]] = []
    d = DnsDiscovery(
        DnsTarget.parse("vllm-headless:8000"), calls.append, resolver=dns.resolve,
        interval=kw.get("interval", 60.0), min_gap=kw.get("min_gap", 0.0),
    )  # fmt: skip
    return d, calls


async def test_members_follow_the_answer_and_only_changes_reach_the_pool():
    dns = FakeDNS("127.0.0.3", "127.0.0.2", "127.0.0.3")
    d, calls = discovery(dns)
    await d.refresh()
    assert calls == [["http://127.0.0.2:8000/v1", "http://127.0.0.3:8000/v1"]]
    await d.refresh()
    assert len(calls) == 1, "an unchanged answer is not pushed again"
    dns.answer = ["127.0.0.3", "127.0.0.4"]
    await d.refresh()
    assert calls[-1] == ["http://127.0.0.3:8000/v1", "http://127.0.0.4:8000/v1"]


async def test_a_failed_lookup_keeps_members_and_a_missing_name_empties_them():
    dns = FakeDNS("127.0.0.2")
    d, calls = discovery(dns)
    await d.refresh()
    dns.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert await d.refresh() == ["http://127.0.0.2:8000/v1"]
    dns.answer = TimeoutError()
    assert await d.refresh() == ["http://127.0.0.2:8000/v1"]
    assert len(calls) == 1
    dns.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert await d.refresh() == []
    assert calls[-1] == []


async def test_interval_and_connect_failures_trigger_lookups():
    dns = FakeDNS("127.0.0.2")
    d, _ = discovery(dns, interval=0.2)
    await d.start()
    try:
        assert dns.lookups == 1  # start() resolves before the gateway serves
        await asyncio.sleep(0.7)
        assert 2 <= dns.lookups <= 5
    finally:
        await d.aclose()
    dns2 = FakeDNS("127.0.0.2")
    d2, _ = discovery(dns2, interval=60.0, min_gap=0.1)
    await d2.start()
    try:
        for _ in range(20):  # a burst of failures costs one lookup per min_gap
            d2.connect_failed()
        await asyncio.sleep(0.3)
        assert dns2.lookups == 2
    finally:
        await d2.aclose()


async def test_system_resolver_resolves_localhost():
    from gateway.discovery import system_resolver

    assert "127.0.0.1" in await system_resolver("localhost", 8000)


# ---- end to end: real servers on several addresses, the gateway in this process -------------


IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAME = "vllm-headless.distill.svc"


@dataclass
class Replicas:
    port: int
    servers: dict[str, StandinServer]

    def url(self, ip: str) -> str:
        return f"http://{ip}:{self.port}/v1"

    def served(self) -> dict[str, int]:
        return {ip: len(s.requests()) for ip, s in self.servers.items()}


def port_free_on_all() -> int:
    for _ in range(20):
        port = free_port()
        try:
            for ip in IPS:
                with socket.socket() as s:
                    s.bind((ip, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every test address")


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    """A stand-in OpenAI server on each of IPS, all on one port (as pods behind a Service)."""
    port = port_free_on_all()
    servers = {}
    try:
        for ip in IPS:
            log = tmp_path / f"replica-{ip}.jsonl"
            err = tmp_path / f"replica-{ip}.stderr"
            options = {"host": ip, "chunk_delay_ms": 150, "model": MODEL}
            with err.open("wb") as f:
                proc = subprocess.Popen(
                    _argv(port, log, options), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f
                )
            servers[ip] = StandinServer(f"http://{ip}:{port}/v1", MODEL, log, port, proc, err)
        for ip, server in servers.items():
            deadline = time.monotonic() + 30
            while True:
                assert server.process.poll() is None, server.stderr_path.read_text()
                try:
                    if httpx.get(f"http://{ip}:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"replica {ip} did not start"
                time.sleep(0.05)
        yield Replicas(port, servers)
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def dns_gateway(tmp_path: Path) -> Iterator[Callable[..., tuple[str, object]]]:
    """Factory: the gateway on GATEWAY_UPSTREAMS_DNS with the test's resolver; returns its
    base URL and its discovery."""
    from gateway.app import create_app
    from gateway.server import build_server, freeze_heap
    from gateway.settings import Settings

    servers = []

    def start(dns: FakeDNS, port: int, interval: float) -> tuple[str, object]:
        gw_port = free_port()
        settings = Settings(
            upstreams_dns=f"{NAME}:{port}", upstreams_dns_interval=interval,
            host="127.0.0.1", port=gw_port, access_log="", connect_timeout=2.0,
        )  # fmt: skip
        app = create_app(settings)
        discovery = app.state.gateway.discovery
        discovery.resolver = dns.resolve
        server = build_server(settings, app)
        freeze_heap()
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 15
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.01)
        return f"http://127.0.0.1:{gw_port}/v1", discovery

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
    gc.unfreeze()


def chat(base: str, **kw: object) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "新闻分类:球队夺冠"}], **kw}
    return httpx.post(base + "/chat/completions", json=body, timeout=30)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_replicas_join_and_leave_without_a_restart(replicas, dns_gateway):
    a, b, c = IPS
    dns = FakeDNS(a, b)
    base, discovery = dns_gateway(dns, replicas.port, interval=0.2)
    assert discovery.members == [replicas.url(a), replicas.url(b)]
    for _ in range(6):
        assert chat(base).status_code == 200
    before = replicas.served()
    assert before[a] > 0 and before[b] > 0 and before[c] == 0
    dns.answer = [b, c]  # a scaled away, c scaled up
    wait_for(lambda: discovery.members == [replicas.url(b), replicas.url(c)])
    for _ in range(6):
        assert chat(base).status_code == 200
    after = replicas.served()
    assert after[a] == before[a], "a removed replica gets no new request"
    assert after[b] > before[b] and after[c] > 0


def test_a_request_in_flight_on_a_removed_replica_finishes(replicas, dns_gateway):
    a, b, _ = IPS
    dns = FakeDNS(a)
    base, discovery = dns_gateway(dns, replicas.port, interval=0.1)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "新闻分类:球队夺冠"}]}
    events = []
    with httpx.stream(
        "POST", base + "/chat/completions", json={**body, "stream": True}, timeout=30
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        dns.answer = [b]  # the replica serving this stream leaves the Service
        wait_for(lambda: discovery.members == [replicas.url(b)])
        assert chat(base).status_code == 200  # new requests go to b meanwhile
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    finishes = [json.loads(e[6:])["choices"][0].get("finish_reason") for e in events[:-1]]
    assert finishes[-1] == "stop", "the stream on the removed replica was cut"
    assert replicas.served()[a] == 1 and replicas.served()[b] == 1


def test_a_failed_connect_looks_the_name_up_again(replicas, dns_gateway):
    a, b, _ = IPS
    dns = FakeDNS(a, b)
    base, discovery = dns_gateway(dns, replicas.port, interval=3600)  # no timed lookup
    lookups = dns.lookups
    replicas.servers[b].stop()  # b is gone; DNS knows, the gateway not yet
    dns.answer = [a]
    for _ in range(4):  # whichever replica it picks, the client gets its answer
        assert chat(base).status_code == 200
    wait_for(lambda: discovery.members == [replicas.url(a)], timeout=3)
    assert dns.lookups > lookups


def test_no_ready_replica_is_a_clear_503_until_one_returns(replicas, dns_gateway):
    a, _, _ = IPS
    dns = FakeDNS()
    dns.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    base, discovery = dns_gateway(dns, replicas.port, interval=0.1)
    assert discovery.members == []
    response = chat(base)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    dns.answer = [a]
    wait_for(lambda: discovery.members == [replicas.url(a)])
    assert chat(base).status_code == 200


# ---- settings ------------------------------------------------------------------------------


def test_dns_and_static_upstreams_are_exclusive_and_checked(monkeypatch):
    from pydantic import ValidationError

    from gateway.settings import Settings

    monkeypatch.setenv("GATEWAY_UPSTREAMS_DNS", "vllm-headless:8000")
    assert Settings().upstreams_dns == "vllm-headless:8000"
    monkeypatch.setenv("GATEWAY_UPSTREAMS", "http://vllm:8000/v1")
    with pytest.raises(ValidationError, match="not both"):
        Settings()
    monkeypatch.delenv("GATEWAY_UPSTREAMS")
    monkeypatch.setenv("GATEWAY_UPSTREAMS_DNS", "vllm-headless")
    with pytest.raises(ValidationError, match="is not host:port"):
        Settings()
    monkeypatch.setenv("GATEWAY_UPSTREAMS_DNS", "")
    assert Settings().upstreams_dns is None
