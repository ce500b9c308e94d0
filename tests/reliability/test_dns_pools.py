"""Per-address pools against a real DNS server: dnsmasq on a loopback port.

dnsmasq (the fixture of ``tests/test_resolve_dns.py``, with a one-second
TTL here) serves A records for ``pool.test``: 127.0.0.2, 127.0.0.3 and
127.0.0.4, one triocomm echo service on each (one port), and SRV records for
``_pool._tcp.test`` pointing at host names of those addresses. The client
asks it through a :class:`triocomm.DnsResolver`. On the real clock, in a few
seconds: the client spreads its connections over the three addresses, fuses
the one whose service is stopped, comes back to it after ``fuse_time`` once
it is up again, follows a change of the records (the hosts file rewritten,
dnsmasq sent SIGHUP) once their TTL has passed, and spreads connections to
an SRV service by priority and weight.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import triocomm
from binaries import require_binary
from triocomm import LengthPrefixed, Target, Timeouts
from triocomm.testing import open_fd_count, task_count

pytest.importorskip("dns.query", reason="DnsResolver needs dnspython (triocomm[dns])")
from test_resolve_dns import Dnsmasq  # after the skip above

pytestmark = pytest.mark.needs_binary("dnsmasq")

CODEC = LengthPrefixed()
IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
TTL = 1
FUSE_TIME = 1.0
HOSTS = "".join(f"{ip} pool.test\n" for ip in IPS) + (
    "127.0.0.2 node-a.test\n127.0.0.3 node-b.test\n127.0.0.4 node-c.test\n"
    # The name the shared fixture's start() waits for.
    "127.0.0.9 svc.test\n"
)
# Real seconds a test waits at most for what should take about TTL or FUSE_TIME.
PATIENCE = 10.0


class ShortDnsmasq(Dnsmasq):
    """The shared dnsmasq fixture's server, with this test's records and a short TTL."""

    def __init__(self, binary: str, directory: Path, service_port: int) -> None:
        super().__init__(binary, directory)
        self.hosts.write_text(HOSTS)
        self.service_port = service_port

    def command(self) -> list[str]:
        kept = [
            option
            for option in super().command()
            if not option.startswith(("--local-ttl=", "--srv-host="))
        ]
        port = self.service_port
        return [
            *kept,
            f"--local-ttl={TTL}",
            f"--srv-host=_pool._tcp.test,node-a.test,{port},10,3",
            f"--srv-host=_pool._tcp.test,node-b.test,{port},10,1",
            f"--srv-host=_pool._tcp.test,node-c.test,{port},20,1",
        ]

    async def start(self) -> None:
        await super().start()
        await self.wait_for("pool.test")


class Services:
    """One echo service per address, on one port; each can be stopped and started again."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.port = 0
        self.servers: dict[str, Any] = {}

    @staticmethod
    async def handle(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
        return conn.local_address[0].encode() + b":" + request  # type: ignore[index]

    async def start(self, ip: str) -> None:
        serve = functools.partial(triocomm.serve, self.handle, self.port, host=ip, codec=CODEC)
        self.servers[ip] = await self.nursery.start(serve)
        self.port = self.servers[ip].port

    async def stop(self, ip: str) -> None:
        await self.servers.pop(ip).shutdown(grace=0)


@pytest.fixture
async def services(nursery: trio.Nursery) -> AsyncIterator[Services]:
    found = Services(nursery)
    for ip in IPS:
        await found.start(ip)
    yield found
    for ip in list(found.servers):
        await found.stop(ip)


@pytest.fixture
async def dnsmasq(tmp_path: Path, services: Services) -> AsyncIterator[ShortDnsmasq]:
    server = ShortDnsmasq(require_binary("dnsmasq"), tmp_path, services.port)
    try:
        await server.start()
        yield server
    finally:
        server.kill()


def ip_of(reply: bytes) -> str:
    return reply.split(b":", 1)[0].decode()


async def requests_until(
    client: triocomm.Client, target: Target[bytes, bytes], done: Any
) -> list[str]:
    """Send requests (each on a new connection) until ``done(ips)``; bounded in real time."""
    ips: list[str] = []
    with trio.move_on_after(PATIENCE):
        while not done(ips):
            ips.append(ip_of(await client.request(target, b"q")))
            await trio.sleep(0.05)
        return ips
    raise AssertionError(f"not done within {PATIENCE}s: {ips[-12:]}")


async def test_spread_fuse_recover_and_follow_the_records(
    dnsmasq: ShortDnsmasq, services: Services
) -> None:
    tasks, fds = task_count(), open_fd_count()
    port = services.port
    # Every request on a new connection, so each one picks an address.
    target = Target(
        "pool.test", port, CODEC, timeouts=Timeouts(keepalive=0), max_fails=2, fuse_time=FUSE_TIME
    )
    resolver = triocomm.DnsResolver([("127.0.0.1", dnsmasq.port)])
    async with resolver, triocomm.open_client(resolver=resolver) as client:
        # Spread: connections held at once go one per address, round and round.
        async with trio.open_nursery() as nursery:
            release = trio.Event()
            held = 0

            async def hold() -> None:
                nonlocal held
                async with client.connection(target) as conn:
                    await conn.send(b"x")
                    await conn.receive()
                    held += 1
                    await release.wait()

            for _ in range(6):
                nursery.start_soon(hold)
            with trio.fail_after(PATIENCE):
                while held < 6:
                    await trio.sleep(0.01)
            in_use = {ip: st.in_use for (ip, _), st in client.address_stats(target).items()}
            assert in_use == dict.fromkeys(IPS, 2)
            release.set()

        # Fuse: .3 is stopped; every request still succeeds, .3 is tried
        # max_fails times and then left alone.
        await services.stop("127.0.0.3")
        ips = [ip_of(await client.request(target, b"q")) for _ in range(9)]
        assert "127.0.0.3" not in ips
        assert client.address_stats(target)[("127.0.0.3", port)].failed == 2
        assert client.stats(target).failed == 0

        # Recovery: .3 is back; after fuse_time its trial connect succeeds.
        await services.start("127.0.0.3")
        ips = await requests_until(client, target, lambda ips: "127.0.0.3" in ips)
        assert client.address_stats(target)[("127.0.0.3", port)].created >= 3

        # The records change: .3 leaves the answer; after the TTL the client follows.
        dnsmasq.change_hosts(HOSTS.replace("127.0.0.3 pool.test\n", ""))
        await dnsmasq.wait_for("pool.test", {"127.0.0.2", "127.0.0.4"})
        await requests_until(
            client, target, lambda ips: ("127.0.0.3", port) not in client.address_stats(target)
        )
        ips = [ip_of(await client.request(target, b"q")) for _ in range(6)]
        assert sorted(set(ips)) == ["127.0.0.2", "127.0.0.4"]
    assert task_count() == tasks
    assert open_fd_count() == fds


async def test_srv_records_spread_by_priority_and_weight(
    dnsmasq: ShortDnsmasq, services: Services
) -> None:
    port = services.port
    target = Target.srv("_pool._tcp.test", CODEC, max_fails=1, fuse_time=60.0)
    resolver = triocomm.DnsResolver([("127.0.0.1", dnsmasq.port)])
    async with resolver, triocomm.open_client(resolver=resolver) as client:
        async with trio.open_nursery() as nursery:
            release = trio.Event()
            held = 0

            async def hold() -> None:
                nonlocal held
                async with client.connection(target) as conn:
                    await conn.send(b"x")
                    assert ip_of(await conn.receive()) in ("127.0.0.2", "127.0.0.3")
                    held += 1
                    await release.wait()

            for _ in range(8):
                nursery.start_soon(hold)
            with trio.fail_after(PATIENCE):
                while held < 8:
                    await trio.sleep(0.01)
            in_use = {host: st.in_use for (host, _), st in client.address_stats(target).items()}
            # Weights 3 and 1 at priority 10; priority 20 is not used while they serve.
            assert in_use == {"node-a.test": 6, "node-b.test": 2, "node-c.test": 0}
            release.set()
        # Both priority-10 services gone: the priority-20 record takes over.
        await services.stop("127.0.0.2")
        await services.stop("127.0.0.3")
        fresh = Timeouts(keepalive=0)
        ips = [ip_of(await client.request(target, b"q", timeouts=fresh)) for _ in range(3)]
        assert ips == ["127.0.0.4"] * 3
        assert client.address_stats(target)[("node-c.test", port)].created == 3
