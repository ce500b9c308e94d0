"""examples/dns_client.py: the resolver against a private dnsmasq, and against our own servers."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing
from dns_client import Resolver, main, parse_server
from dns_server import DEMO_ZONE, Zone
from dnswire import TYPE_A, Message, Question, build_message, parse_message

import triocomm
from binaries import free_udp_and_tcp_port
from conftest import require_binary, wait_until_listening

BIG_TXT = [str(i) * 100 for i in range(8)]  # 800 bytes: too long for a plain datagram


def dnsmasq_command(binary: str, port: int, directory: Path) -> list[str]:
    """A dnsmasq answering for *.test from its command line only: no config file,
    no /etc/hosts, no upstream servers, loopback only, in the foreground."""
    return [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--local=/test/",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        f"--log-facility={directory / 'dnsmasq.log'}",
        "--host-record=host.test,192.0.2.10,2001:db8::10",
        "--txt-record=small.test,hello dns",
        "--txt-record=big.test," + ",".join(BIG_TXT),
    ]


@pytest.fixture
async def dnsmasq(tmp_path: Path) -> AsyncIterator[int]:
    """A private dnsmasq on a free loopback port; yields the port."""
    binary = require_binary("dnsmasq")
    port = free_udp_and_tcp_port()
    process = subprocess.Popen(
        dnsmasq_command(binary, port, tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_until_listening(port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        finally:
            if process.stderr is not None:
                process.stderr.close()


@pytest.mark.needs_binary("dnsmasq")
async def test_the_resolver_asks_dnsmasq_over_udp(dnsmasq: int) -> None:
    async with triocomm.open_client() as client:
        resolver = Resolver(client, "127.0.0.1", dnsmasq)
        answer = await resolver.lookup("host.test", "A")
        assert (answer.status, answer.transport) == ("NOERROR", "udp")
        assert [r[1:] for r in answer.records] == [("A", 0, "192.0.2.10")]
        answer = await resolver.lookup("HOST.test.", "AAAA")
        assert [(r[0], r[3]) for r in answer.records] == [("host.test", "2001:db8::10")]
        answer = await resolver.lookup("small.test", "TXT")
        assert [r[3] for r in answer.records] == ["hello dns"]
        assert (await resolver.lookup("nope.test")).status == "NXDOMAIN"
        stats = client.stats(resolver.udp)
        assert (stats.created, stats.reused, stats.failed) == (1, 3, 0)
        assert client.stats(resolver.tcp).created == 0


@pytest.mark.needs_binary("dnsmasq")
async def test_a_truncated_answer_is_asked_again_over_tcp(dnsmasq: int) -> None:
    async with triocomm.open_client() as client:
        resolver = Resolver(client, "127.0.0.1", dnsmasq)
        answer = await resolver.lookup("big.test", "TXT")
        assert (answer.status, answer.transport) == ("NOERROR", "tcp")
        # One TXT record of eight strings (dig shows them joined, as here).
        assert [r[3] for r in answer.records] == ["".join(BIG_TXT)]
        assert client.stats(resolver.tcp).created == 1


@pytest.mark.needs_binary("dnsmasq")
async def test_the_command_line(dnsmasq: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert await main(f"127.0.0.1:{dnsmasq}", "host.test", "AAAA") == 0
    out = capsys.readouterr().out
    assert out == ";; status: NOERROR, over udp\nhost.test.\t0\tIN\tAAAA\t2001:db8::10\n"


def test_parse_server() -> None:
    assert parse_server("127.0.0.1:5300") == ("127.0.0.1", 5300)
    assert parse_server("[::1]:53") == ("::1", 53)
    assert parse_server("[::1]") == ("::1", 53)
    assert parse_server("ns.example") == ("ns.example", 53)


# -- against our own server, where a loss or a wrong answer can be arranged -----


@pytest.fixture
def zone() -> Zone:
    return Zone.from_dict("example.test", DEMO_ZONE)


async def test_a_lost_datagram_is_sent_again(
    zone: Zone, autojump_clock: trio.testing.MockClock
) -> None:
    seen = 0

    async def lossy(query: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes | None:
        nonlocal seen
        seen += 1
        return None if seen % 3 else zone.answer(query, True)  # answers every third

    async with trio.open_nursery() as nursery, triocomm.open_client() as client:
        server = await nursery.start(
            functools.partial(
                triocomm.serve_datagrams, lossy, 0, host="127.0.0.1", codec=triocomm.Raw()
            )
        )
        resolver = Resolver(client, "127.0.0.1", server.port)
        answer = await resolver.lookup("www.example.test", "A")
        assert answer.attempts == 3
        assert [r[3] for r in answer.records] == ["192.0.2.2", "192.0.2.3"]
        with pytest.raises(triocomm.CommTimeout):
            await Resolver(client, "127.0.0.1", server.port, attempts=2).lookup("example.test")
        nursery.cancel_scope.cancel()


async def test_an_answer_to_another_question_is_refused() -> None:
    async def wrong(query: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        asked = parse_message(query)
        other = Message(asked.id ^ 1, 0x8000, [Question("example.test", TYPE_A)])
        return build_message(other)

    async with trio.open_nursery() as nursery, triocomm.open_client() as client:
        server = await nursery.start(
            functools.partial(
                triocomm.serve_datagrams, wrong, 0, host="127.0.0.1", codec=triocomm.Raw()
            )
        )
        with pytest.raises(triocomm.ProtocolError, match="does not match"):
            await Resolver(client, "127.0.0.1", server.port).lookup("example.test")
        nursery.cancel_scope.cancel()
