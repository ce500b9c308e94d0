"""CachingResolver: TTLs, one lookup per name, stale answers, bounds, errors.

The system's resolver is replaced by a fake (trio's own hook,
``trio.socket.set_custom_hostname_resolver``) that counts its calls and can
be held, so that a test decides when a lookup lands; time is a
``MockClock``. One test asks the real system for ``localhost``.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm._resolve import STALE_RETRY, SrvResolver, resolve_with_expiry
from triocomm.testing import task_count


class FakeSystemResolver(trio.abc.HostnameResolver):
    """Answers getaddrinfo from a table; can hold every lookup until released."""

    def __init__(self) -> None:
        self.table: dict[str, list[str] | OSError] = {}
        self.calls: list[str] = []
        self.hold: trio.Event | None = None
        self.cancelled = 0

    async def getaddrinfo(  # type: ignore[override]
        self, host: bytes | str, port: Any, family: int = 0, type: int = 0, proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:  # fmt: skip
        name = host.decode() if isinstance(host, bytes) else host
        self.calls.append(name)
        if self.hold is not None:
            try:
                await self.hold.wait()
            except trio.Cancelled:
                self.cancelled += 1
                raise
        else:
            await trio.lowlevel.checkpoint()
        answer = self.table.get(name)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if isinstance(answer, OSError):
            raise answer
        infos: list[tuple[Any, ...]] = []
        for ip in answer:
            # Like the real one: one entry per protocol, so addresses repeat.
            for proto_ in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
                if ":" in ip:
                    infos.append((socket.AF_INET6, socket.SOCK_STREAM, proto_, "", (ip, 0, 0, 0)))
                else:
                    infos.append((socket.AF_INET, socket.SOCK_STREAM, proto_, "", (ip, 0)))
        return infos

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def ask_then_give_up(resolver: triocomm.CachingResolver, name: str) -> None:
    """Ask for ``name``, wait until the lookup is under way, then cancel the asker."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resolver.resolve, name, 1)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


@pytest.fixture
async def system() -> AsyncIterator[FakeSystemResolver]:
    fake = FakeSystemResolver()
    fake.table["db.test"] = ["10.0.0.1", "2001:db8::1", "10.0.0.2"]
    trio.socket.set_custom_hostname_resolver(fake)
    try:
        yield fake
    finally:
        trio.socket.set_custom_hostname_resolver(None)


async def test_numeric_hosts_need_no_lookup_and_no_running_resolver(
    system: FakeSystemResolver,
) -> None:
    resolver = triocomm.CachingResolver()
    assert await resolver.resolve("127.0.0.1", 80) == [("127.0.0.1", 80)]
    assert await resolver.resolve("::1", 443) == [("::1", 443)]
    answer = await resolver.lookup("10.1.2.3", 7)
    assert answer.expires_at == math.inf
    assert not answer.expired()
    assert system.calls == []


async def test_addresses_are_ipv4_and_ipv6_once_each_in_order(system: FakeSystemResolver) -> None:
    async with triocomm.CachingResolver() as resolver:
        assert await resolver.resolve("db.test", 6379) == [
            ("10.0.0.1", 6379), ("2001:db8::1", 6379), ("10.0.0.2", 6379),
        ]  # fmt: skip
        # One lookup per name, whatever the port; names are case-insensitive.
        assert await resolver.resolve("DB.test", 80) == [
            ("10.0.0.1", 80), ("2001:db8::1", 80), ("10.0.0.2", 80),
        ]  # fmt: skip
    assert system.calls == ["db.test"]


async def test_answers_live_for_the_ttl(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    async with triocomm.CachingResolver(ttl=30) as resolver:
        first = await resolver.lookup("db.test", 1)
        assert (first.ttl, first.expires_at - first.resolved_at) == (30, 30)
        mock_clock.jump(29.5)
        assert first.age() == 29.5
        assert not first.expired()
        assert await resolver.lookup("db.test", 1) == first
        assert system.calls == ["db.test"]
        system.table["db.test"] = ["10.0.0.9"]
        mock_clock.jump(0.5)
        assert first.expired()
        second = await resolver.lookup("db.test", 1)
        assert second.records == (("10.0.0.9", 1),)
        assert second.resolved_at == first.resolved_at + 30
        assert not second.stale
        assert system.calls == ["db.test", "db.test"]


async def test_ttl_zero_looks_up_every_time(system: FakeSystemResolver) -> None:
    async with triocomm.CachingResolver(ttl=0) as resolver:
        for _ in range(3):
            await resolver.resolve("db.test", 1)
    assert system.calls == ["db.test"] * 3


async def test_concurrent_askers_share_one_lookup(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()
    results: list[list[tuple[str, int]]] = []

    async def ask() -> None:
        results.append(await resolver.resolve("db.test", 5))

    async with triocomm.CachingResolver() as resolver, trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert system.calls == ["db.test"]
        system.hold.set()
    assert len(results) == 10
    assert all(result == results[0] for result in results)
    assert system.calls == ["db.test"]


async def test_a_cancelled_asker_does_not_cancel_the_others_lookup(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()
    got: list[list[tuple[str, int]]] = []

    async def ask() -> None:
        got.append(await resolver.resolve("db.test", 5))

    async with triocomm.CachingResolver() as resolver, trio.open_nursery() as nursery:
        # The first asker starts the lookup, then is cancelled.
        with trio.CancelScope() as first:
            async with trio.open_nursery() as inner:
                inner.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(ask)
                await trio.testing.wait_all_tasks_blocked()
                first.cancel()
        assert first.cancelled_caught
        assert got == []
        system.hold.set()
    assert got == [[("10.0.0.1", 5), ("2001:db8::1", 5), ("10.0.0.2", 5)]]
    assert system.calls == ["db.test"]
    assert system.cancelled == 0


async def test_a_lookup_nobody_waits_for_fills_the_cache(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()
    async with triocomm.CachingResolver() as resolver:
        await ask_then_give_up(resolver, "db.test")
        system.hold.set()
        await trio.testing.wait_all_tasks_blocked()
        assert resolver.cached_names == 1
        await resolver.resolve("db.test", 1)
    assert system.calls == ["db.test"]


async def test_leaving_the_block_ends_lookups_under_way(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()  # never set: the lookup would wait forever
    before = task_count()
    async with triocomm.CachingResolver() as resolver:
        await ask_then_give_up(resolver, "db.test")
        assert task_count() == before + 1  # the lookup goes on without its asker
    assert task_count() == before
    assert system.cancelled == 1
    with pytest.raises(RuntimeError, match="not running"):
        await resolver.resolve("db.test", 1)
    # It may be entered again.
    system.hold.set()
    async with resolver:
        assert len(await resolver.resolve("db.test", 1)) == 3


async def test_an_asker_outside_the_block_learns_that_it_closed(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()
    resolver = triocomm.CachingResolver()
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await resolver.resolve("db.test", 1)
        except RuntimeError as error:
            errors.append(error)

    async with trio.open_nursery() as nursery, resolver:
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
    assert len(errors) == 1
    assert "closed while it looked up 'db.test'" in str(errors[0])


async def test_the_resolver_must_be_entered_once(system: FakeSystemResolver) -> None:
    resolver = triocomm.CachingResolver()
    with pytest.raises(RuntimeError, match=r"async with CachingResolver"):
        await resolver.resolve("db.test", 1)
    async with resolver:
        with pytest.raises(RuntimeError, match="already running"):
            await resolver.__aenter__()


async def test_a_body_error_comes_out_as_itself(system: FakeSystemResolver) -> None:
    with pytest.raises(KeyError):
        async with triocomm.CachingResolver():
            raise KeyError("boom")


async def test_a_failed_refresh_serves_the_stale_answer(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    async with triocomm.CachingResolver(ttl=60) as resolver:
        fresh = await resolver.lookup("db.test", 1)
        system.table["db.test"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure")
        mock_clock.jump(60)
        stale = await resolver.lookup("db.test", 1)
        assert stale.stale
        assert stale.records == fresh.records
        assert stale.resolved_at == fresh.resolved_at
        assert stale.expires_at == trio.current_time() + STALE_RETRY
        # Until then the stale answer is served without another lookup.
        mock_clock.jump(STALE_RETRY - 1)
        assert await resolver.lookup("db.test", 1) == stale
        assert system.calls == ["db.test"] * 2
        mock_clock.jump(1)
        assert (await resolver.lookup("db.test", 1)).stale
        assert system.calls == ["db.test"] * 3
        # A refresh that works again ends the staleness.
        system.table["db.test"] = ["10.0.0.3"]
        mock_clock.jump(STALE_RETRY)
        again = await resolver.lookup("db.test", 1)
        assert (again.records, again.stale) == ((("10.0.0.3", 1),), False)


async def test_a_name_that_is_gone_drops_its_answer(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    async with triocomm.CachingResolver(ttl=10) as resolver:
        await resolver.resolve("db.test", 1)
        del system.table["db.test"]
        mock_clock.jump(10)
        with pytest.raises(socket.gaierror, match=r"cannot resolve 'db\.test'") as caught:
            await resolver.resolve("db.test", 1)
        assert caught.value.errno == socket.EAI_NONAME
        assert resolver.cached_names == 0


async def test_every_concurrent_asker_gets_the_error(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    system.hold = trio.Event()
    errors: list[socket.gaierror] = []

    async def ask() -> None:
        try:
            await resolver.resolve("nowhere.test", 1)
        except socket.gaierror as error:
            errors.append(error)

    async with triocomm.CachingResolver() as resolver, trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        system.hold.set()
    assert len(errors) == 3
    assert len({id(error) for error in errors}) == 3  # each its own copy
    assert all("cannot resolve 'nowhere.test'" in str(error) for error in errors)
    assert system.calls == ["nowhere.test"]
    # A failure is not cached: the next asker looks up again.
    async with resolver:
        with pytest.raises(OSError, match=r"nowhere\.test"):
            await resolver.resolve("nowhere.test", 1)
    assert system.calls == ["nowhere.test"] * 2


async def test_a_lookup_that_takes_too_long_fails_or_serves_stale(
    system: FakeSystemResolver, autojump_clock: trio.testing.MockClock
) -> None:
    async with triocomm.CachingResolver(ttl=60, timeout=2) as resolver:
        system.hold = trio.Event()  # never set
        start = trio.current_time()
        with pytest.raises(socket.gaierror, match=r"no answer within 2s") as caught:
            await resolver.resolve("db.test", 1)
        assert caught.value.errno == socket.EAI_AGAIN
        assert trio.current_time() - start == 2
        system.hold = None
        await resolver.resolve("db.test", 1)
        system.hold = trio.Event()
        autojump_clock.jump(60)
        assert (await resolver.lookup("db.test", 1)).stale


async def test_the_cache_keeps_at_most_max_names(
    system: FakeSystemResolver, mock_clock: trio.testing.MockClock
) -> None:
    names = [f"n{i}.test" for i in range(5)]
    for name in names:
        system.table[name] = ["10.9.9.9"]
    async with triocomm.CachingResolver(max_names=3) as resolver:
        for name in names[:3]:
            await resolver.resolve(name, 1)
        await resolver.resolve(names[0], 1)  # used again: the last to go
        for name in names[3:]:
            await resolver.resolve(name, 1)
        assert resolver.cached_names == 3
        system.calls.clear()
        await resolver.resolve(names[0], 1)
        assert system.calls == []
        await resolver.resolve(names[1], 1)
        assert system.calls == [names[1]]


async def test_a_name_the_idna_codec_refuses_is_a_gaierror(system: FakeSystemResolver) -> None:
    async with triocomm.CachingResolver() as resolver:
        with pytest.raises(socket.gaierror, match="cannot resolve"):
            await resolver.resolve("x" * 64 + ".test", 1)


async def test_an_unexpected_error_reaches_the_askers_not_the_nursery(
    system: FakeSystemResolver,
) -> None:
    system.table["bug.test"] = []
    async with triocomm.CachingResolver() as resolver:
        with pytest.raises(socket.gaierror, match="no address"):
            await resolver.resolve("bug.test", 1)

        async def broken(name: str) -> tuple[tuple[str, ...], float | None]:
            raise ZeroDivisionError("a bug")

        resolver._query_addresses = broken  # type: ignore[method-assign]
        with pytest.raises(socket.gaierror, match="ZeroDivisionError") as caught:
            await resolver.resolve("db.test", 1)
        assert isinstance(caught.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": -1}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"timeout": 0}, "timeout"),
        ({"max_names": 0}, "max_names"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        triocomm.CachingResolver(**kwargs)


async def test_bad_arguments_are_refused() -> None:
    async with triocomm.CachingResolver() as resolver:
        with pytest.raises(ValueError, match="empty"):
            await resolver.resolve("", 1)
        with pytest.raises(ValueError, match="port"):
            await resolver.resolve("localhost", 70000)


async def test_localhost_resolves_through_the_system() -> None:
    async with triocomm.CachingResolver() as resolver:
        addresses = await resolver.resolve("localhost", 8080)
    assert addresses
    assert {ip for ip, _ in addresses} <= {"127.0.0.1", "::1"}
    assert {port for _, port in addresses} == {8080}


def test_the_resolvers_are_resolvers() -> None:
    assert isinstance(triocomm.CachingResolver(), triocomm.Resolver)


async def test_any_resolver_gets_an_expiry(mock_clock: trio.testing.MockClock) -> None:
    class Static:
        async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
            return [("10.0.0.5", port)]

    assert isinstance(Static(), triocomm.Resolver)
    answer = await resolve_with_expiry(Static(), "svc", 9)
    assert answer.records == (("10.0.0.5", 9),)
    assert answer.expired()  # ask it again next time
    async with triocomm.CachingResolver(ttl=5) as caching:
        answer = await resolve_with_expiry(caching, "127.0.0.1", 9)
        assert not answer.expired()


def test_import_triocomm_needs_no_dnspython() -> None:
    script = "import sys, triocomm; sys.exit('dns' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=30)
    assert result.returncode == 0


def test_dns_resolver_without_dnspython_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import dns...` raise ImportError.
    for name in [name for name in sys.modules if name == "dns" or name.startswith("dns.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dns", None)
    with pytest.raises(ImportError, match=r"triocomm\[dns\]"):
        triocomm.DnsResolver(["127.0.0.1"])


def test_dns_resolver_names_a_trio_too_old_for_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncbackend = pytest.importorskip("dns.asyncbackend")

    def refuse(name: str) -> None:
        raise ImportError("trio not found or too old")

    monkeypatch.setattr(asyncbackend, "get_backend", refuse)
    with pytest.raises(ImportError, match=r"refuses trio .* upgrade trio"):
        triocomm.DnsResolver(["127.0.0.1"])


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ([], "non-empty"),
        ("127.0.0.1", "non-empty"),
        (["dns.example"], "IP address"),
        ([("127.0.0.1", 0)], "port"),
        ([("::1", 65536)], "port"),
    ],
)
def test_dns_resolver_checks_its_servers(servers: Any, message: str) -> None:
    pytest.importorskip("dns.asyncresolver")
    with pytest.raises(ValueError, match=message):
        triocomm.DnsResolver(servers)


def test_dns_resolver_is_a_resolver_of_srv_records_too() -> None:
    pytest.importorskip("dns.asyncresolver")
    resolver = triocomm.DnsResolver(["127.0.0.1", ("::1", 5353)], ttl=5)
    assert isinstance(resolver, SrvResolver)
    assert not isinstance(triocomm.CachingResolver(), SrvResolver)
    assert repr(resolver) == "DnsResolver([127.0.0.1:53, ::1:5353], ttl=5)"


@pytest.mark.parametrize("name", ["x" * 64 + ".test", "a..test"])
async def test_dns_resolver_refuses_a_malformed_name_without_asking(name: str) -> None:
    pytest.importorskip("dns.asyncresolver")
    # Port 9 (discard): nothing answers there, and nothing is asked.
    async with triocomm.DnsResolver([("127.0.0.1", 9)], timeout=1) as resolver:
        with pytest.raises(socket.gaierror, match="not a valid name") as caught:
            await resolver.resolve(name, 1)
    assert caught.value.errno == socket.EAI_NONAME
