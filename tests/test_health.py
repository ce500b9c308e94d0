"""Connection health on the client: health checks before lending, TCP keep-alive
(client and service), connection lifetimes and a minimum of idle connections.

Servers are scripted raw-Trio servers (``test_client_peers``); time runs on
a mock clock wherever a limit is involved.
"""

from __future__ import annotations

import functools
import itertools
import socket
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import LengthPrefixed, PoolStats, Target, Timeouts, open_client
from triocomm._server import ServiceOptions

try:
    from .test_client_peers import Peer, ScriptedServer, echo, open_fds, scripted_server
except ImportError:
    from test_client_peers import Peer, ScriptedServer, echo, open_fds, scripted_server

CODEC = LengthPrefixed()
NO_LIMITS = Timeouts(connect=None, inactivity=None, keepalive=None)
Conn = triocomm.Connection[bytes, bytes]


def target_of(server: ScriptedServer, **options: Any) -> Target[bytes, bytes]:
    options.setdefault("timeouts", NO_LIMITS)
    return Target("127.0.0.1", server.port, CODEC, **options)


def assert_consistent(stats: PoolStats) -> None:
    assert stats.open == stats.idle + stats.in_use
    assert stats.open == stats.created - stats.closed


class Checks:
    """A health check that records the connections it ran on and fails on request."""

    def __init__(self) -> None:
        self.ran: list[int] = []
        self.fail: BaseException | None = None

    async def __call__(self, conn: Conn) -> None:
        self.ran.append(conn.id)
        if self.fail is not None:
            raise self.fail
        await conn.send(b"ping")
        assert await conn.receive() == b"ping"


# -- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"health_check_after": -1}, ValueError),
        ({"health_check_after": "30"}, TypeError),
        ({"health_check": "ping"}, TypeError),
        ({"tcp_keepalive": 0.5}, ValueError),
        ({"tcp_keepalive": True}, TypeError),
        ({"max_lifetime": 0}, ValueError),
        ({"max_lifetime": "1h"}, TypeError),
        ({"min_idle": -1}, ValueError),
        ({"min_idle": 3, "max_connections": 2}, ValueError),
    ],
)
def test_target_refuses_bad_health_options(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        Target("127.0.0.1", 7000, CODEC, **options)


def test_the_service_option_is_checked_too() -> None:
    with pytest.raises(ValueError, match="tcp_keepalive"):
        ServiceOptions.build(CODEC, tcp_keepalive=0)
    assert ServiceOptions.build(CODEC, tcp_keepalive=30).tcp_keepalive == 30


def test_a_unix_target_takes_the_health_options() -> None:
    check = Checks()
    target = Target.unix("/run/app.sock", CODEC, health_check=check, max_lifetime=60, min_idle=1)
    assert (target.health_check, target.max_lifetime, target.min_idle) == (check, 60, 1)


# -- health checks --------------------------------------------------------------------


async def test_a_connection_idle_long_enough_is_checked_before_it_is_lent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    check = Checks()
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, health_check=check, health_check_after=30.0)
        await client.request(target, b"a")  # a new connection: no check
        await trio.sleep(10)
        await client.request(target, b"b")  # idle 10 s: no check
        assert check.ran == []
        await trio.sleep(30)
        async with client.connection(target) as conn:
            assert await client.request(target, b"c") == b"c"  # a second connection
            assert check.ran == [conn.id]  # idle 30 s: checked once
            seq = conn.seq
        assert seq == 3  # "a", "b", the check (a session of its own), this block
        await client.request(target, b"d")  # used just now: no check
        assert len(check.ran) == 1
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.health_checks_failed) == (2, 3, 0)


@pytest.mark.parametrize("failure", ["raises", "unread data", "too slow"])
async def test_a_connection_failing_its_check_is_closed_and_never_seen(
    autojump_clock: trio.testing.MockClock, failure: str
) -> None:
    async def check(conn: Conn) -> None:
        if failure == "raises":
            raise RuntimeError("unhealthy")
        if failure == "too slow":
            with trio.fail_after(3):  # the check's own bound on its own wait
                await trio.sleep_forever()
        await conn.send(b"ping")
        # "unread data": the reply is left unread, once it is there
        await trio.lowlevel.wait_readable(conn.stream.socket)  # type: ignore[attr-defined]

    async def numbered(peer: Peer) -> None:
        while (payload := await peer.read_frame()) is not None:
            await peer.send_frame(b"%d:%s" % (peer.number, payload))

    async with scripted_server(numbered) as server, open_client() as client:
        target = target_of(server, health_check=check, health_check_after=1.0)
        assert await client.request(target, b"a") == b"1:a"
        await trio.sleep(2)
        assert await client.request(target, b"b") == b"2:b"
        stats = client.stats(target)
        assert (stats.health_checks_failed, stats.created, stats.reused) == (1, 2, 0)
        assert stats.failed == 0  # the session never saw it
        assert_consistent(stats)


async def test_a_check_waiting_for_a_reply_is_bound_by_the_targets_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent_after_one(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            await peer.wait_eof()  # a black hole from now on
            return
        await echo(peer)

    check = Checks()
    timeouts = NO_LIMITS.replace(first_response=5.0)
    async with scripted_server(silent_after_one) as server, open_client() as client:
        target = target_of(server, health_check=check, health_check_after=1.0, timeouts=timeouts)
        await client.request(target, b"a")
        await trio.sleep(2)
        start = trio.current_time()
        assert await client.request(target, b"b") == b"b"
        assert trio.current_time() - start == pytest.approx(5.0)  # mock clock: exact
        assert client.stats(target).health_checks_failed == 1


async def test_a_cancelled_check_closes_the_connection_and_counts_no_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_check(conn: Conn) -> None:
        await trio.sleep(100)

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, health_check=slow_check, health_check_after=1.0)
        await client.request(target, b"a")
        await trio.sleep(2)
        with trio.move_on_after(10) as scope:
            await client.request(target, b"b")
        assert scope.cancelled_caught
        stats = client.stats(target)
        assert (stats.health_checks_failed, stats.closed, stats.in_use, stats.reused) == (
            0,
            1,
            0,
            0,
        )
        assert_consistent(stats)


async def test_without_a_check_an_old_idle_connection_is_lent_as_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, health_check_after=1.0)  # no health_check
        await client.request(target, b"a")
        await trio.sleep(50)
        await client.request(target, b"b")
        assert (client.stats(target).created, client.stats(target).reused) == (1, 1)


# -- max_lifetime ----------------------------------------------------------------------


async def test_an_idle_connection_is_closed_when_its_lifetime_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_lifetime=10.0)
        await client.request(target, b"a")
        await trio.sleep(5)
        await client.request(target, b"b")  # 5 s old: reused
        await trio.sleep(6)
        assert client.stats(target).closed == 1  # closed at 10 s, with no borrow
        await client.request(target, b"c")
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (2, 1, 1)


async def test_a_lent_connection_past_its_lifetime_is_closed_when_its_session_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_lifetime=10.0)
        async with client.connection(target) as conn:
            await trio.sleep(11)
            await conn.send(b"x")
            assert await conn.receive() == b"x"
        stats = client.stats(target)
        assert (stats.closed, stats.idle, stats.failed) == (1, 0, 0)


# -- TCP keep-alive --------------------------------------------------------------------


def keepalive_of(sock: Any) -> tuple[int, ...]:
    values = [sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)]
    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"):
        if hasattr(socket, name):
            values.append(sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name)))
    return tuple(values)


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="no TCP_KEEPIDLE here")
async def test_tcp_keepalive_sets_the_probes_on_client_sockets() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        async with client.connection(target_of(server, tcp_keepalive=20.5)) as conn:
            assert keepalive_of(conn.stream.socket) == (1, 21, 7, 3)  # type: ignore[attr-defined]
        async with client.connection(target_of(server)) as conn:
            assert keepalive_of(conn.stream.socket)[0] == 0  # type: ignore[attr-defined]


async def test_tcp_keepalive_leaves_a_unix_socket_alone(short_tmp: str) -> None:
    path = f"{short_tmp}/s.sock"
    async with scripted_server(echo, path=path), open_client() as client:
        target = Target.unix(path, CODEC)
        object.__setattr__(target, "tcp_keepalive", 5.0)  # as if it were allowed
        assert await client.request(target, b"x") == b"x"


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="no TCP_KEEPIDLE here")
async def test_a_service_sets_tcp_keepalive_on_accepted_sockets(nursery: trio.Nursery) -> None:
    seen: list[tuple[int, ...]] = []

    async def handler(request: bytes, conn: Conn) -> bytes:
        seen.append(keepalive_of(conn.stream.socket))  # type: ignore[attr-defined]
        return request

    for keepalive in (None, 9):
        server = await nursery.start(
            functools.partial(
                triocomm.serve, handler, 0, host="127.0.0.1", codec=CODEC, tcp_keepalive=keepalive
            )
        )
        async with open_client() as client:
            await client.request(Target("127.0.0.1", server.port, CODEC), b"x")
        await server.shutdown(grace=1)
    assert seen[0][0] == 0
    assert seen[1] == (1, 9, 3, 3)


# -- min_idle --------------------------------------------------------------------------


async def wait_for(predicate: Any, limit: float = 5.0) -> None:
    """Bounded polling for what background tasks do over real sockets."""
    with trio.fail_after(limit):
        while not predicate():
            await trio.sleep(0.005)


async def test_min_idle_opens_connections_in_the_background_after_first_use() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, min_idle=2)
        assert client.stats(target) == PoolStats()  # nothing before the first use
        await client.request(target, b"a")
        # Two opened while the first was in use (or one, if it came back first).
        await wait_for(lambda: client.stats(target).idle >= 2)
        async with client.connection(target), client.connection(target):
            # Idle ones lent: more are opened to stand by.
            await wait_for(lambda: client.stats(target).idle >= 2)
            assert client.stats(target).in_use == 2
        stats = client.stats(target)
        assert stats.created == stats.idle >= 4
        assert stats.reused == 2
        assert_consistent(stats)


async def test_min_idle_never_exceeds_max_connections() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, min_idle=2, max_connections=3)
        async with client.connection(target), client.connection(target):
            await wait_for(lambda: client.stats(target).open == 3)
            await trio.testing.wait_all_tasks_blocked()
            stats = client.stats(target)
            assert (stats.open, stats.idle, stats.connecting) == (3, 1, 0)


async def test_min_idle_replaces_a_connection_that_closes() -> None:
    async def close_the_first(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            return  # closes after one reply
        await echo(peer)

    async with scripted_server(close_the_first) as server, open_client() as client:
        target = target_of(server, min_idle=1)
        await client.request(target, b"a")
        await wait_for(lambda: client.stats(target).closed == 1)
        await wait_for(lambda: client.stats(target).idle == 1)
        assert server.accepted == 2


async def test_failed_background_connects_back_off(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from triocomm import _client

    times: list[float] = []

    async def refuse(target: Target[Any, Any]) -> trio.abc.Stream:
        times.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise triocomm.ConnectError("refused (fake)", address=target)

    monkeypatch.setattr(_client, "_open_stream", refuse)
    async with open_client() as client:
        target = Target("127.0.0.1", 9, CODEC, min_idle=1)
        start = trio.current_time()
        with pytest.raises(triocomm.ConnectError):
            await client.request(target, b"x")
        await trio.sleep(100)
    pauses = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == start
    assert pauses == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


async def test_no_background_connection_outlives_the_client() -> None:
    async with scripted_server(echo) as server:
        fds = open_fds()
        async with open_client() as client:
            target = target_of(server, min_idle=3)
            await client.request(target, b"a")
            await wait_for(lambda: client.stats(target).idle >= 3)
        assert open_fds() == fds
        await wait_for(lambda: server.closed == server.accepted)


# -- idle detection on a borrowed connection -------------------------------------------


async def test_on_idle_fires_every_period_while_idle_until_the_block_exits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[float, triocomm.Idle]] = []

    async def on_idle(conn: Conn, status: triocomm.Idle) -> None:
        calls.append((trio.current_time() - start, status))

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        start = trio.current_time()
        async with client.connection(target, idle={triocomm.Idle.READ: 10.0}, on_idle=on_idle):
            await trio.sleep(35)
        await trio.sleep(50)  # nothing after the block
        assert calls == [
            (10.0, triocomm.Idle.READ),
            (20.0, triocomm.Idle.READ),
            (30.0, triocomm.Idle.READ),
        ]
        assert client.stats(target).idle == 1  # the block ended well: pooled


async def test_heartbeats_keep_a_subscription_busy(autojump_clock: trio.testing.MockClock) -> None:
    beats: list[float] = []

    async def heartbeat(conn: Conn, status: triocomm.Idle) -> None:
        beats.append(trio.current_time() - start)
        await conn.send(b"heartbeat")

    async with scripted_server(echo) as server, open_client() as client:
        start = trio.current_time()
        async with client.connection(
            target_of(server), idle={triocomm.Idle.WRITE: 5.0}, on_idle=heartbeat
        ) as conn:
            await trio.sleep(3)
            await conn.send(b"mine")  # a write: the WRITE period starts again
            assert await conn.receive() == b"mine"
            await trio.sleep(12)
            assert await conn.receive() == b"heartbeat"
            assert await conn.receive() == b"heartbeat"
    assert beats == [8.0, 13.0]


async def test_a_failing_on_idle_closes_the_connection_not_the_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(conn: Conn, status: triocomm.Idle) -> None:
        raise RuntimeError("broken callback")

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(trio.ClosedResourceError):
            async with client.connection(
                target, idle={triocomm.Idle.BOTH: 1.0}, on_idle=broken
            ) as conn:
                await trio.sleep(2)
                await conn.send(b"x")
        assert "on_idle(BOTH) raised RuntimeError('broken callback')" in caplog.text
        assert await client.request(target, b"still fine") == b"still fine"


async def test_a_callback_running_when_the_block_exits_is_cancelled_and_the_connection_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended = trio.Event()

    async def slow(conn: Conn, status: triocomm.Idle) -> None:
        try:
            await trio.sleep(100)
        finally:
            ended.set()

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        async with client.connection(target, idle={triocomm.Idle.READ: 1.0}, on_idle=slow):
            await trio.sleep(2)
        await ended.wait()
        stats = client.stats(target)
        assert (stats.idle, stats.closed, stats.failed) == (0, 1, 0)


@pytest.mark.parametrize(
    ("idle", "on_idle", "error"),
    [
        ({triocomm.Idle.READ: 1.0}, None, ValueError),
        (None, "callback", ValueError),
        ({"read": 1.0}, "callback", TypeError),
        ({triocomm.Idle.READ: 0}, "callback", ValueError),
        ({triocomm.Idle.READ: "1"}, "callback", TypeError),
    ],
)
async def test_connection_refuses_bad_idle_options(idle: Any, on_idle: Any, error: type) -> None:
    async with open_client() as client:
        with pytest.raises(error):
            client.connection(Target("127.0.0.1", 9, CODEC), idle=idle, on_idle=on_idle)
