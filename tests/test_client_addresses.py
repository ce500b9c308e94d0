"""Per-address pools: a name's addresses, resolved by the client's resolver.

Three echo services on 127.0.0.2, 127.0.0.3 and 127.0.0.4 (one port), a
fake system resolver (trio's ``set_custom_hostname_resolver``) that answers
``svc.test`` from a table, and a ``MockClock`` that moves only when a test
jumps it: spreading, max_connections across addresses, fuses and their
recovery, TTL refreshes that drop addresses, retries to another address,
SRV targets, and the resolver's ownership.
"""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import LengthPrefixed, PoolStats, RetryPolicy, Target, Timeouts
from triocomm.testing import open_fd_count, task_count

CODEC = LengthPrefixed()
IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAME = "svc.test"


class TableResolver(trio.abc.HostnameResolver):
    """getaddrinfo from a table (numeric hosts never get here: trio answers them)."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}
        self.calls = 0

    async def getaddrinfo(  # type: ignore[override]
        self, host: bytes | str, port: Any, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:  # fmt: skip
        await trio.lowlevel.checkpoint()
        self.calls += 1
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in self.table[name]]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


class Services:
    """One echo service per address, on one port; each can be stopped and started again."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.port = 0
        self.servers: dict[str, Any] = {}
        self.failing: set[str] = set()

    async def handle(self, request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
        ip = conn.local_address[0]  # type: ignore[index]
        if ip in self.failing:
            raise RuntimeError("this address fails its requests")
        return ip.encode() + b":" + request

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
async def table() -> AsyncIterator[TableResolver]:
    fake = TableResolver()
    fake.table[NAME] = list(IPS)
    old = trio.socket.set_custom_hostname_resolver(fake)
    yield fake
    trio.socket.set_custom_hostname_resolver(old)


def by_ip(stats: dict[tuple[str, int], PoolStats]) -> dict[str, PoolStats]:
    return {ip: st for (ip, _), st in stats.items()}


def assert_sums(client: triocomm.Client, target: Target[Any, Any]) -> None:
    """The target's stats are the sums of its addresses' (for the fields that add up)."""
    total = client.stats(target)
    parts = client.address_stats(target).values()
    for name in ("open", "idle", "in_use", "created", "reused", "closed"):
        assert getattr(total, name) == sum(getattr(st, name) for st in parts), name
    assert total.open == total.idle + total.in_use


async def until(condition: Callable[[], bool]) -> None:
    """Wait (on real time, bounded) until ``condition()`` holds: I/O is not a task's wait."""
    for _ in range(2000):
        await trio.testing.wait_all_tasks_blocked()
        if condition():
            return
        await trio.to_thread.run_sync(time.sleep, 0.005)
    raise AssertionError("the condition never held")


class Holder:
    """Borrowers that each do one exchange, then keep their connection until released."""

    def __init__(self, client: triocomm.Client, target: Target[bytes, bytes]) -> None:
        self.client = client
        self.target = target
        self.ready = 0
        self.done = 0
        self.releases: list[trio.Event] = []
        # The releases of the borrowers that have their connection, in that order.
        self.holding: list[trio.Event] = []

    async def start(self, count: int, nursery: trio.Nursery, *, ready: int | None = None) -> None:
        for _ in range(count):
            release = trio.Event()
            self.releases.append(release)
            nursery.start_soon(self._borrow, release)
        want = self.ready + (count if ready is None else ready)
        await until(lambda: self.ready >= want)

    async def _borrow(self, release: trio.Event) -> None:
        async with self.client.connection(self.target) as conn:
            await conn.send(b"x")
            await conn.receive()
            self.ready += 1
            self.holding.append(release)
            await release.wait()
        self.done += 1

    async def release(self, count: int | None = None) -> None:
        """Release ``count`` borrowers that hold a connection (all by default); wait until done."""
        pending = [r for r in self.holding if not r.is_set()][:count]
        want = self.done + len(pending)
        for release in pending:
            release.set()
        await until(lambda: self.done >= want)


async def test_connections_spread_over_the_addresses(
    services: Services, table: TableResolver, nursery: trio.Nursery
) -> None:
    target = Target(NAME, services.port, CODEC)
    async with triocomm.open_client() as client:
        holder = Holder(client, target)
        await holder.start(6, nursery)
        stats = by_ip(client.address_stats(target))
        assert sorted(stats) == list(IPS)
        assert [st.in_use for st in stats.values()] == [2, 2, 2]
        assert client.stats(target).in_use == 6
        assert_sums(client, target)
        await holder.release()
        # Idle connections are reused from any address, the last pooled first.
        replies = {await client.request(target, b"y") for _ in range(3)}
        assert len(replies) == 1
        assert client.stats(target).created == 6
        assert client.stats(target).reused == 3
        assert_sums(client, target)
    assert table.calls == 1  # one lookup: the answer lives for the TTL


async def test_a_new_connection_goes_where_fewest_are_in_use(
    services: Services, table: TableResolver, nursery: trio.Nursery
) -> None:
    keepalive0 = Timeouts(keepalive=0)
    target = Target(NAME, services.port, CODEC, timeouts=keepalive0)
    async with triocomm.open_client() as client:
        # Ties rotate: sequential requests, each on a new connection, go round.
        replies = [await client.request(target, b"q") for _ in range(6)]
        assert [r.split(b":")[0].decode() for r in replies] == list(IPS) * 2
        assert [st.created for st in by_ip(client.address_stats(target)).values()] == [2, 2, 2]


async def test_max_connections_bounds_the_target_over_its_addresses(
    services: Services, table: TableResolver, nursery: trio.Nursery
) -> None:
    target = Target(NAME, services.port, CODEC, max_connections=2)
    async with triocomm.open_client() as client:
        holder = Holder(client, target)
        await holder.start(3, nursery, ready=2)
        await until(lambda: client.stats(target).waiting == 1)
        assert client.stats(target).in_use == 2
        assert sum(st.open for st in client.address_stats(target).values()) == 2
        await holder.release(1)
        await until(lambda: holder.ready == 3)
        stats = client.stats(target)
        assert (stats.in_use, stats.waiting, stats.created, stats.reused) == (2, 0, 2, 1)
        await holder.release()


async def test_a_failing_address_is_fused_then_tried_again(
    services: Services, table: TableResolver, mock_clock: trio.testing.MockClock
) -> None:
    target = Target(
        NAME, services.port, CODEC, timeouts=Timeouts(keepalive=0), max_fails=2, fuse_time=5.0
    )
    await services.stop("127.0.0.3")
    async with triocomm.open_client() as client:
        # Every request succeeds: a refused address is skipped for the next one.
        replies = [await client.request(target, b"q") for _ in range(9)]
        assert all(not r.startswith(b"127.0.0.3") for r in replies)
        stats = by_ip(client.address_stats(target))
        assert stats["127.0.0.3"].failed == 2  # then fused: no more tries
        assert stats["127.0.0.3"].created == 0
        assert client.stats(target).failed == 0
        await services.start("127.0.0.3")
        mock_clock.jump(4.9)
        for _ in range(3):
            await client.request(target, b"q")
        assert by_ip(client.address_stats(target))["127.0.0.3"].created == 0
        mock_clock.jump(0.2)
        replies = [await client.request(target, b"q") for _ in range(6)]
        assert sum(r.startswith(b"127.0.0.3") for r in replies) == 2
        assert by_ip(client.address_stats(target))["127.0.0.3"].failed == 2


async def test_every_address_fused_fails_at_once(
    table: TableResolver, mock_clock: trio.testing.MockClock
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    target = Target(NAME, port, CODEC, max_fails=1, fuse_time=5.0)
    async with triocomm.open_client() as client:
        with pytest.raises(triocomm.ConnectError) as first:
            await client.request(target, b"q")
        assert first.value.address == target.address
        assert isinstance(first.value.__cause__, OSError)
        with pytest.raises(triocomm.ConnectError, match="every address is fused"):
            await client.request(target, b"q")
        assert sum(st.failed for st in client.address_stats(target).values()) == 3


async def test_a_refresh_drops_an_address_idle_close_busy_finish(
    services: Services,
    table: TableResolver,
    mock_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    target = Target(NAME, services.port, CODEC, min_idle=3)
    resolver = triocomm.CachingResolver(ttl=5.0)
    async with resolver, triocomm.open_client(resolver=resolver) as client:
        assert client.address_stats(target) == {}
        await client.request(target, b"start")  # the target is used: spares are made
        await until(lambda: client.stats(target).idle == 3)
        stats = by_ip(client.address_stats(target))
        assert all(st.open == 1 for st in stats.values())
        table.table[NAME] = ["127.0.0.2"]
        mock_clock.jump(6.0)
        holder = Holder(client, target)
        await holder.start(1, nursery)  # lends the last pooled
        # The spare made for it looked the name up again.
        await until(lambda: client.stats(target).idle >= 1 and table.calls == 2)
        stats = by_ip(client.address_stats(target))
        dropped = [ip for ip in IPS[1:] if ip in stats]
        # Only a lent connection of a dropped address is left, to finish its session.
        assert all(stats[ip].in_use == 1 and stats[ip].idle == 0 for ip in dropped)
        assert stats["127.0.0.2"].idle >= 1
        await holder.release()
        assert sorted(by_ip(client.address_stats(target))) == ["127.0.0.2"]
        # The ledgers of the addresses gone, and without connections, are forgotten.
        assert len(client._pools[target]._ledgers) == 1
        assert_sums_live(client, target)


def assert_sums_live(client: triocomm.Client, target: Target[Any, Any]) -> None:
    total = client.stats(target)
    parts = client.address_stats(target).values()
    for name in ("open", "idle", "in_use"):
        assert getattr(total, name) == sum(getattr(st, name) for st in parts), name


async def test_a_retry_goes_to_another_address(services: Services, table: TableResolver) -> None:
    services.failing.add("127.0.0.2")
    target = Target(NAME, services.port, CODEC)
    policy = RetryPolicy(attempts=3, on=("lost",))
    async with triocomm.open_client() as client:
        reply = await client.request(target, b"q", retries=policy, idempotent=True)
        assert reply == b"127.0.0.3:q"
        stats = by_ip(client.address_stats(target))
        assert stats["127.0.0.2"].failed == 1
        assert client.stats(target).retries == 1


async def test_a_resolver_failure_is_a_connect_error(table: TableResolver) -> None:
    target = Target("missing.test", 7, CODEC)
    async with triocomm.open_client() as client:
        with pytest.raises(triocomm.ConnectError) as info:
            await client.request(target, b"q")
    assert info.value.address == "missing.test:7"
    assert isinstance(info.value.__cause__, socket.gaierror)


class FixedResolver:
    """A resolver of one's own: a table of addresses (ports of their own) and SRV records."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self.srv: dict[str, list[tuple[str, int, int, int]]] = {}
        self.calls = 0

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if host not in self.addresses:
            raise socket.gaierror(socket.EAI_NONAME, f"no {host}")
        return self.addresses[host]

    async def resolve_srv(self, name: str) -> list[tuple[str, int, int, int]]:
        await trio.lowlevel.checkpoint()
        return self.srv[name]


async def test_a_resolver_of_ones_own_is_asked_for_every_new_connection(
    services: Services,
) -> None:
    resolver = FixedResolver()
    resolver.addresses["own.test"] = [("127.0.0.4", services.port)]
    target = Target("own.test", 1, CODEC, timeouts=Timeouts(keepalive=0))
    async with triocomm.open_client(resolver=resolver) as client:
        assert await client.request(target, b"a") == b"127.0.0.4:a"
        assert await client.request(target, b"b") == b"127.0.0.4:b"
        # A numeric host never reaches it.
        await client.request(Target("127.0.0.2", services.port, CODEC), b"c")
    assert resolver.calls == 2


async def test_srv_target_uses_priority_then_weight(services: Services) -> None:
    resolver = FixedResolver()
    port = services.port
    resolver.srv["_echo._tcp.test"] = [
        ("127.0.0.2", port, 1, 3),
        ("127.0.0.3", port, 1, 1),
        ("127.0.0.4", port, 2, 1),
    ]
    target = Target.srv("_echo._tcp.test", CODEC)
    assert str(target) == "_echo._tcp.test"
    async with trio.open_nursery() as nursery, triocomm.open_client(resolver=resolver) as client:
        holder = Holder(client, target)
        await holder.start(8, nursery)
        stats = client.address_stats(target)
        assert {a: st.in_use for a, st in stats.items()} == {
            ("127.0.0.2", port): 6,
            ("127.0.0.3", port): 2,
            ("127.0.0.4", port): 0,
        }
        await holder.release()
        await services.stop("127.0.0.2")
        await services.stop("127.0.0.3")
        # The lower priority serves once the first ones fail (and are fused).
        fresh = Timeouts(keepalive=0)
        replies = [await client.request(target, b"q", timeouts=fresh) for _ in range(2)]
        assert all(r.startswith(b"127.0.0.4") for r in replies)


async def test_srv_needs_a_resolver_with_resolve_srv() -> None:
    target = Target.srv("_echo._tcp.test", CODEC)
    async with triocomm.open_client() as client:
        with pytest.raises(TypeError, match="resolve_srv"):
            await client.request(target, b"q")
    with pytest.raises(TypeError, match="SRV"):
        Target("_echo._tcp.test", 0, CODEC, srv_lookup=True, max_datagram=512)


async def test_a_resolver_passed_in_is_the_users_to_enter() -> None:
    resolver = triocomm.CachingResolver()
    target = Target("localhost.test", 7, CODEC)
    async with triocomm.open_client(resolver=resolver) as client:
        with pytest.raises(RuntimeError, match="not running"):
            await client.request(target, b"q")
    with pytest.raises(TypeError, match="resolver"):
        triocomm.open_client(resolver=object())  # type: ignore[arg-type]


async def test_the_default_resolver_ends_with_the_client(
    services: Services, table: TableResolver
) -> None:
    tasks, fds = task_count(), open_fd_count()
    async with triocomm.open_client() as client:
        await client.request(Target(NAME, services.port, CODEC), b"q")
    assert task_count() == tasks
    assert open_fd_count() == fds


async def test_udp_targets_resolve_through_the_client_resolver() -> None:
    resolver = FixedResolver()
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.3", 0))
        port = sock.getsockname()[1]
        resolver.addresses["udp.test"] = [("127.0.0.3", port)]

        async def answer() -> None:
            data, peer = await sock.recvfrom(100)
            await sock.sendto(data, peer)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            async with triocomm.open_client(resolver=resolver) as client:
                reply = await client.request(Target.udp("udp.test", 9, CODEC), b"ping")
    assert reply == b"ping"
    assert resolver.calls == 1


async def test_health_checks_count_per_address(
    services: Services,
    table: TableResolver,
    mock_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
) -> None:
    async def check(conn: triocomm.Connection[bytes, bytes]) -> None:
        if conn.remote_address[0] == "127.0.0.3":  # type: ignore[index]
            raise RuntimeError("unhealthy")

    target = Target(NAME, services.port, CODEC, health_check=check, health_check_after=1.0)
    async with triocomm.open_client() as client:
        holder = Holder(client, target)
        await holder.start(3, nursery)
        await holder.release()
        mock_clock.jump(2.0)
        # Three sessions at once: each idle connection is checked before it is
        # lent; the one to .3 fails and is replaced by a new connection.
        holder = Holder(client, target)
        await holder.start(3, nursery)
        stats = by_ip(client.address_stats(target))
        assert stats["127.0.0.3"].health_checks_failed == 1
        assert client.stats(target).health_checks_failed == 1
        assert client.stats(target).created == 4
        assert client.stats(target).reused == 2
        assert_sums(client, target)
        await holder.release()


async def test_a_udp_target_whose_name_fails_is_a_connect_error() -> None:
    resolver = FixedResolver()
    resolver.addresses["empty.test"] = []
    async with triocomm.open_client(resolver=resolver) as client:
        for name in ("missing.test", "empty.test"):
            with pytest.raises(triocomm.ConnectError) as info:
                await client.request(Target.udp(name, 9, CODEC), b"ping")
            assert info.value.address == f"{name}:9"
            assert isinstance(info.value.__cause__, socket.gaierror)


async def test_observers_hear_of_each_failed_address(
    services: Services, table: TableResolver
) -> None:
    class Failures(triocomm.Observer):
        def __init__(self) -> None:
            self.addresses: list[object] = []

        def connect_failed(self, address: Any, error: BaseException) -> None:
            self.addresses.append(address)

    failures = Failures()
    await services.stop("127.0.0.2")
    target = Target(NAME, services.port, CODEC)
    async with triocomm.open_client(observers=[failures]) as client:
        assert await client.request(target, b"q") == b"127.0.0.3:q"
        with pytest.raises(triocomm.ConnectError):
            await client.request(Target("missing.test", 7, CODEC), b"q")
    assert failures.addresses == [("127.0.0.2", services.port), ("missing.test", 7)]
