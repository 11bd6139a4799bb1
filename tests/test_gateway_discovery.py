"""GATEWAY_UPSTREAMS_DNS: the upstream pool follows a DNS name (a Kubernetes headless Service).

The end-to-end tests run real stand-in servers on several loopback addresses (127.0.0.2, .3,
.4) on one port, as the pods behind a headless Service are, and the gateway in this process;
the only stand-in is the DNS answer, which the test controls.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.discovery import DnsDiscovery, DnsTarget


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
