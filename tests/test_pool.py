"""Pool rules, one test each: LIFO reuse, stale connections, failed sessions,
the one retry, max_connections with FIFO waiters and the pool timeout,
cancelled waiters, on_connect, and PoolStats adding up.

Servers are scripted raw-Trio servers (``test_client_peers``).
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

import triocomm
from triocomm import (
    CommTimeout,
    ConnectionLost,
    LengthPrefixed,
    PoolStats,
    Target,
    Timeouts,
    open_client,
)

try:
    from .test_client_peers import Peer, ScriptedServer, echo, frame, scripted_server
except ImportError:
    from test_client_peers import Peer, ScriptedServer, echo, frame, scripted_server

CODEC = LengthPrefixed()
# No limit but the ones a test is about; connect=None also keeps MockClock's
# autojump from firing a connect deadline while loopback I/O completes.
NO_LIMITS = Timeouts(connect=None, inactivity=None, keepalive=None)

Conn = triocomm.Connection[bytes, bytes]


def assert_consistent(stats: PoolStats) -> None:
    """The invariants PoolStats promises at every moment."""
    assert stats.open == stats.idle + stats.in_use
    assert stats.open == stats.created - stats.closed
    assert min(vars(stats).values()) >= 0


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.005)


async def numbered(peer: Peer) -> None:
    """Reply to every frame with ``<connection number>:<payload>``."""
    while (payload := await peer.read_frame()) is not None:
        await peer.send_frame(b"%d:%s" % (peer.number, payload))


def target_of(server: ScriptedServer, **options: object) -> Target[bytes, bytes]:
    return Target("127.0.0.1", server.port, CODEC, **options)  # type: ignore[arg-type]


# -- reuse ------------------------------------------------------------------------------


async def test_reuse_is_lifo() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        async with (
            client.connection(target) as a,
            client.connection(target) as b,
            client.connection(target) as c,
        ):
            ids = [a.id, b.id, c.id]
        # Returned in the order c, b, a: a, returned last, is lent first.
        async with client.connection(target) as first, client.connection(target) as second:
            assert (first.id, second.id) == (ids[0], ids[1])
            async with client.connection(target) as third:
                assert third.id == ids[2]
        # Returned c, b, a again; now lend one, give it back, lend again.
        for _ in range(2):
            async with client.connection(target) as again:
                assert again.id == ids[0]
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.idle) == (3, 5, 3)
        assert_consistent(stats)


async def test_an_idle_connection_closed_by_the_peer_is_discarded_before_reuse() -> None:
    async def one_reply_then_close(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")

    async with scripted_server(one_reply_then_close) as server, open_client() as client:
        target = target_of(server)
        assert await client.request(target, b"a") == b"a"
        await wait_for(lambda: server.closed == 1)
        # Borrow at once, before the idle watcher had a chance to run: the
        # check on lending must catch it.
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed, stats.failed) == (2, 0, 1, 0)
        assert_consistent(stats)


async def test_the_idle_watcher_discards_a_connection_the_peer_closed() -> None:
    async def one_reply_then_close(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")

    async with scripted_server(one_reply_then_close) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"a")
        await wait_for(lambda: client.stats(target).closed == 1)  # without any borrow
        stats = client.stats(target)
        assert (stats.idle, stats.open) == (0, 0)


@pytest.mark.parametrize("borrow_at_once", [True, False])
async def test_stray_bytes_while_idle_discard_the_connection(borrow_at_once: bool) -> None:
    sent_stray = trio.Event()

    async def reply_then_stray(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")
        if peer.number == 1:
            await trio.sleep(0.02)
            await peer.send_frame(b"unasked")
            sent_stray.set()
        await numbered(peer)

    async with scripted_server(reply_then_stray) as server, open_client() as client:
        target = target_of(server)
        assert await client.request(target, b"a") == b"a"
        await sent_stray.wait()
        if not borrow_at_once:
            await wait_for(lambda: client.stats(target).closed == 1)
        assert await client.request(target, b"b") == b"b"  # never b"unasked"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (2, 0, 1)


async def test_stray_bytes_with_the_reply_keep_the_connection_out_of_the_pool() -> None:
    async def reply_and_extra(peer: Peer) -> None:
        if peer.number == 1:
            payload = await peer.read_frame() or b""
            await peer.send_raw(frame(payload) + frame(b"extra"))  # one write
        await echo(peer)

    async with scripted_server(reply_and_extra) as server, open_client() as client:
        target = target_of(server)
        assert await client.request(target, b"a") == b"a"
        assert client.stats(target).idle == 0
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (2, 0, 1)


async def test_over_tls_an_idle_connection_closed_by_the_peer_is_discarded(
    server_ssl_context: object, client_ssl_context: object
) -> None:
    async def one_reply_then_close(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")

    async with (
        scripted_server(one_reply_then_close, ssl_context=server_ssl_context) as server,  # type: ignore[arg-type]
        open_client() as client,
    ):
        target = Target("localhost", server.port, CODEC, ssl_context=client_ssl_context)  # type: ignore[arg-type]
        assert await client.request(target, b"a") == b"a"
        await wait_for(lambda: server.closed == 1)
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (2, 0, 1)


@pytest.mark.parametrize("tls", [False, True])
async def test_a_reset_while_idle_is_handled_by_the_watcher(
    tls: bool, server_ssl_context: object, client_ssl_context: object
) -> None:
    async def reply_then_reset(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")
        if peer.number == 1:
            raw = peer.stream.transport_stream if tls else peer.stream  # type: ignore[attr-defined]
            # Linger 0: close() sends an RST instead of a FIN.
            raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        await echo(peer)

    async with (
        scripted_server(
            reply_then_reset, ssl_context=server_ssl_context if tls else None
        ) as server,  # type: ignore[arg-type]
        open_client() as client,
    ):
        host = "localhost" if tls else "127.0.0.1"
        context = client_ssl_context if tls else None
        target = Target(host, server.port, CODEC, ssl_context=context)  # type: ignore[arg-type]
        assert await client.request(target, b"a") == b"a"
        # The watcher meets the reset; it must not raise into the client's nursery.
        await wait_for(lambda: client.stats(target).closed == 1)
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.failed) == (2, 0, 0)


async def test_over_tls_part_of_a_stray_record_while_idle_discards_the_connection(
    server_ssl_context: object, client_ssl_context: object
) -> None:
    go, sent_part = trio.Event(), trio.Event()

    async def reply_then_half_a_record(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")
        if peer.number == 1:
            await go.wait()  # the client is idle by now
            # Encrypt a stray message by hand and send only the first bytes of
            # its TLS record: the client's watcher reads them, and the record
            # cannot be decrypted yet (reaching into trio's SSLStream is fine
            # in a test).
            tls = peer.stream
            tls._ssl_object.write(frame(b"stray"))  # type: ignore[attr-defined]
            record = tls._outgoing.read()  # type: ignore[attr-defined]
            await tls.transport_stream.send_all(record[:7])  # type: ignore[attr-defined]
            sent_part.set()
            await trio.sleep_forever()
        await echo(peer)

    async with (
        scripted_server(reply_then_half_a_record, ssl_context=server_ssl_context) as server,  # type: ignore[arg-type]
        open_client() as client,
    ):
        target = Target("localhost", server.port, CODEC, ssl_context=client_ssl_context)  # type: ignore[arg-type]
        assert await client.request(target, b"a") == b"a"
        await trio.testing.wait_all_tasks_blocked()  # the watcher waits
        go.set()
        await sent_part.wait()
        await trio.sleep(0.05)  # the watcher pulls the partial record in
        assert client.stats(target).idle == 1  # not decryptable: nothing to see yet
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.failed) == (2, 0, 0)


# -- failed, timed-out and cancelled sessions close their connection --------------------


async def test_a_cancelled_request_never_leaks_its_reply_to_the_next_one() -> None:
    async def slow_echo(peer: Peer) -> None:
        while (payload := await peer.read_frame()) is not None:
            await trio.sleep(0.2)
            await peer.send_frame(payload)

    async with scripted_server(slow_echo) as server, open_client() as client:
        target = target_of(server)
        assert await client.request(target, b"warm") == b"warm"
        with trio.move_on_after(0.05) as scope:
            await client.request(target, b"first")  # its reply is still coming
        assert scope.cancelled_caught
        assert await client.request(target, b"second") == b"second"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed, stats.failed) == (2, 1, 1, 1)
        assert_consistent(stats)


async def test_a_timed_out_session_closes_its_connection() -> None:
    async def slow_first(peer: Peer) -> None:
        if peer.number == 1:
            await peer.read_frame()
            await trio.sleep(0.3)
            await peer.send_frame(b"late")
        await numbered(peer)

    async with scripted_server(slow_first) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(CommTimeout):
            await client.request(target, b"a", timeouts=NO_LIMITS.replace(first_response=0.1))
        await trio.sleep(0.4)  # the late reply has arrived by now, on a closed socket
        assert await client.request(target, b"b") == b"2:b"
        assert client.stats(target).closed == 1


async def test_a_session_that_raises_closes_its_connection() -> None:
    async def half_read(conn: Conn) -> None:
        await conn.send(b"a")
        raise RuntimeError("gave up before the reply")

    async with scripted_server(numbered) as server, open_client() as client:
        target = target_of(server)
        with pytest.raises(RuntimeError):
            await client.run(target, half_read)
        assert await client.request(target, b"b") == b"2:b"


# -- the one retry ------------------------------------------------------------------


async def test_a_reused_connection_failing_before_any_reply_byte_is_retried_once() -> None:
    async def stale_after_one(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            await peer.read_frame()  # the second request: hang up unanswered
            return
        await numbered(peer)

    async with scripted_server(stale_after_one) as server, open_client() as client:
        target = target_of(server)
        assert await client.request(target, b"a") == b"a"
        assert await client.request(target, b"b") == b"2:b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.failed) == (2, 1, 1)
        assert server.accepted == 2


async def test_a_reused_connection_found_reset_is_retried_with_run() -> None:
    calls = 0

    async def exchange(conn: Conn) -> bytes:
        nonlocal calls
        calls += 1
        await conn.send(b"x")
        return await conn.receive()

    async def stale_after_one(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            await peer.read_frame()
            return
        await numbered(peer)

    async with scripted_server(stale_after_one) as server, open_client() as client:
        target = target_of(server)
        await client.run(target, exchange)
        assert await client.run(target, exchange) == b"2:x"
        assert calls == 3


async def test_never_retried_once_reply_bytes_arrived() -> None:
    requests: list[bytes] = []

    async def half_reply_second_time(peer: Peer) -> None:
        while (payload := await peer.read_frame()) is not None:
            requests.append(payload)
            if len(requests) == 2:
                await peer.send_raw(frame(b"partial reply")[:6])
                return
            await peer.send_frame(payload)

    async with scripted_server(half_reply_second_time) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"a")
        with pytest.raises(ConnectionLost):
            await client.request(target, b"b")
        assert requests == [b"a", b"b"]  # sent once, not again
        assert server.accepted == 1


async def test_retries_0_disables_the_retry() -> None:
    async def stale_after_one(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")
        await peer.read_frame()

    async with scripted_server(stale_after_one) as server, open_client(retries=0) as client:
        target = target_of(server)
        await client.request(target, b"a")
        with pytest.raises(ConnectionLost, match="before replying"):
            await client.request(target, b"b")
        assert server.accepted == 1


async def test_the_retry_happens_only_once() -> None:
    async def always_stale(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
        await peer.read_frame()  # every later request: hang up unanswered

    async with scripted_server(always_stale) as server, open_client(retries=1) as client:
        target = target_of(server)
        await client.request(target, b"a")
        with pytest.raises(ConnectionLost):
            await client.request(target, b"b")
        assert server.accepted == 2  # the reused one, then one fresh retry


# -- max_connections, FIFO waiters, the pool timeout --------------------------------


async def test_max_connections_queues_sessions_fifo() -> None:
    order: list[int] = []

    async def session(n: int, client: triocomm.Client, target: Target[bytes, bytes]) -> None:
        async with client.connection(target):
            order.append(n)
            await trio.sleep(0.001)  # let later arrivals pile up behind

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=1)
        async with trio.open_nursery() as nursery, client.connection(target):
            for n in range(6):
                nursery.start_soon(session, n, client, target)
                await trio.testing.wait_all_tasks_blocked()
            stats = client.stats(target)
            assert (stats.in_use, stats.waiting, stats.connecting) == (1, 6, 0)
        assert order == [0, 1, 2, 3, 4, 5]  # served in the order they queued
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.waiting) == (1, 6, 0)
        assert server.accepted == 1


async def test_max_connections_bounds_concurrent_connections() -> None:
    peak = 0

    async def session(client: triocomm.Client, target: Target[bytes, bytes]) -> None:
        nonlocal peak
        async with client.connection(target) as conn:
            stats = client.stats(target)
            peak = max(peak, stats.open + stats.connecting)
            await conn.send(b"x")
            await conn.receive()

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=3)
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(session, client, target)
        assert peak == 3
        assert server.accepted == 3
        assert client.stats(target).created + client.stats(target).reused == 20


async def test_a_slot_freed_by_a_closed_connection_goes_to_the_first_waiter() -> None:
    async with scripted_server(numbered) as server, open_client() as client:
        target = target_of(server, max_connections=1)
        results: list[bytes] = []

        async def waiter() -> None:
            results.append(await client.request(target, b"w"))

        async with trio.open_nursery() as nursery:
            with pytest.raises(ValueError, match="drop"):
                async with client.connection(target):
                    nursery.start_soon(waiter)
                    await trio.testing.wait_all_tasks_blocked()
                    assert client.stats(target).waiting == 1
                    raise ValueError("drop it")
        assert results == [b"2:w"]  # a new connection in the freed slot


async def test_pool_timeout_names_the_target_and_frees_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=1, timeouts=NO_LIMITS.replace(pool=1.5))
        async with client.connection(target):
            with pytest.raises(CommTimeout, match=r"pool timeout.*1\.5s.*127\.0\.0\.1"):
                await client.request(target, b"x")
            assert client.stats(target).waiting == 0
        assert await client.request(target, b"y") == b"y"
        assert_consistent(client.stats(target))


async def test_a_waiter_cancelled_while_waiting_never_loses_a_slot() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=1)
        served: list[str] = []

        async def wait_in_line(name: str, scope: trio.CancelScope) -> None:
            with scope:
                async with client.connection(target):
                    served.append(name)

        b_scope, c_scope = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery, client.connection(target):
            nursery.start_soon(wait_in_line, "b", b_scope)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wait_in_line, "c", c_scope)
            await trio.testing.wait_all_tasks_blocked()
            assert client.stats(target).waiting == 2
            # b is cancelled, and in the same instant (no checkpoint in
            # between) the connection is handed to b: the netty#9669 race.
            b_scope.cancel()
            # (leaving the block returned the connection synchronously)
        assert served == ["c"]
        assert b_scope.cancelled_caught
        stats = client.stats(target)
        assert (stats.waiting, stats.in_use, stats.idle, stats.connecting) == (0, 0, 1, 0)
        assert_consistent(stats)
        assert await client.request(target, b"still works") == b"still works"


async def test_a_waiter_granted_a_new_slot_then_cancelled_passes_it_on() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=1)
        served: list[str] = []

        async def wait_in_line(name: str, scope: trio.CancelScope) -> None:
            with scope:
                served.append((await client.request(target, name.encode())).decode())

        b_scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            with pytest.raises(KeyError):
                async with client.connection(target):
                    nursery.start_soon(wait_in_line, "b", b_scope)
                    await trio.testing.wait_all_tasks_blocked()
                    nursery.start_soon(wait_in_line, "c", trio.CancelScope())
                    await trio.testing.wait_all_tasks_blocked()
                    b_scope.cancel()
                    raise KeyError  # the connection closes: a *slot* goes to b
        assert served == ["c"]
        stats = client.stats(target)
        assert (stats.waiting, stats.connecting, stats.open, stats.created) == (0, 0, 1, 2)
        assert_consistent(stats)


async def test_a_session_cancelled_while_connecting_returns_its_slot() -> None:
    class Hanging(trio.abc.HostnameResolver):
        async def getaddrinfo(self, *args: object, **kwargs: object) -> list[object]:
            await trio.sleep_forever()
            raise AssertionError

        async def getnameinfo(self, *args: object) -> tuple[str, str]:
            raise NotImplementedError

    trio.socket.set_custom_hostname_resolver(Hanging())
    try:
        async with open_client() as client:
            target = Target("hangs.example", 1, CODEC, max_connections=1)
            with trio.move_on_after(0.05):
                await client.request(target, b"x")
            stats = client.stats(target)
            assert (stats.connecting, stats.failed, stats.open) == (0, 1, 0)
    finally:
        trio.socket.set_custom_hostname_resolver(None)


# -- on_connect and PoolStats ---------------------------------------------------------


async def test_on_connect_runs_on_new_connections_only() -> None:
    handshakes: list[int] = []

    async def hello(conn: Conn) -> None:
        assert conn.seq == 0
        handshakes.append(conn.id)
        await conn.send(b"HELLO")
        await conn.receive()

    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, on_connect=hello)
        for _ in range(3):
            await client.request(target, b"x")
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(client.request, target, b"y")
        stats = client.stats(target)
        assert len(handshakes) == stats.created == len(set(handshakes))
        assert stats.created + stats.reused == 6


async def test_stats_add_up_after_a_mix_of_everything() -> None:
    received: list[bytes] = []

    async def mixed(peer: Peer) -> None:
        while (payload := await peer.read_frame()) is not None:
            received.append(payload)
            if payload == b"hangup":
                return
            if payload == b"slow":
                await trio.sleep(0.2)
            if payload == b"stray":
                await peer.send_raw(frame(payload) + frame(b"extra"))
                continue
            await peer.send_frame(payload)

    snapshots: list[PoolStats] = []
    async with scripted_server(mixed) as server, open_client() as client:
        target = target_of(server, max_connections=3, timeouts=Timeouts(first_response=0.1))

        async def one(payload: bytes) -> None:
            try:
                await client.request(target, payload)
            except (CommTimeout, ConnectionLost):
                pass
            snapshots.append(client.stats(target))

        async with trio.open_nursery() as nursery:
            for i in range(40):
                payload = [b"ok", b"slow", b"hangup", b"stray", b"ok"][i % 5]
                nursery.start_soon(one, payload)
                if i % 7 == 0:
                    await trio.sleep(0.01)
                    snapshots.append(client.stats(target))
            with trio.move_on_after(0.05):
                await client.request(target, b"slow")  # cancelled mid-session
        await trio.testing.wait_all_tasks_blocked()
        final = client.stats(target)
    for stats in [*snapshots, final]:
        assert_consistent(stats)
        assert stats.open + stats.connecting <= 3
    # Every attempt that got a connection (new or reused) sent its request
    # once; retries of stale connections are attempts too.
    assert final.waiting == final.in_use == final.connecting == 0
    assert final.created + final.reused == len(received)
    assert final.failed >= 8 + 8 + 1  # 8 hangups, 8 slow (timed out), 1 cancelled
    assert final.closed >= final.failed


# -- settle before watching: lending costs the connection task nothing ------------------

SETTLE = triocomm._pool._SETTLE


class ConnectionTaskSteps(trio.abc.Instrument):
    """Counts the steps run by connection tasks (the pool's, not the sessions')."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("connection_task"):
            self.steps += 1


async def test_a_connection_lent_again_within_the_settle_time_never_wakes_its_task() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server)
        await client.request(target, b"warm")
        await trio.testing.wait_all_tasks_blocked()  # the connection task sleeps
        counter = ConnectionTaskSteps()
        trio.lowlevel.add_instrument(counter)
        start = trio.current_time()
        try:
            for i in range(200):
                assert await client.request(target, b"%d" % i) == b"%d" % i
        finally:
            trio.lowlevel.remove_instrument(counter)
        elapsed = trio.current_time() - start
        # Only the settle deadline wakes it, at most about once per settle
        # time (it then finds the connection in use and sleeps on). A pool
        # that woke it on every release would take 200 steps or more.
        assert counter.steps <= 2 * (elapsed / SETTLE + 1)
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (1, 200, 0)


async def test_a_keepalive_shorter_than_the_settle_time_closes_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = SETTLE / 5
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, timeouts=NO_LIMITS.replace(keepalive=keepalive))
        await client.request(target, b"x")
        await trio.sleep(keepalive * 0.9)
        assert client.stats(target).idle == 1
        await trio.sleep(keepalive * 0.2)  # well before the settle time is over
        stats = client.stats(target)
        assert (stats.idle, stats.open, stats.closed) == (0, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert server.closed == 1  # the socket really is closed


async def test_a_watched_connection_lent_and_returned_at_once_stays_pooled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, timeouts=NO_LIMITS)
        assert await client.request(target, b"a") == b"a"
        await trio.sleep(SETTLE * 2)
        await trio.testing.wait_all_tasks_blocked()
        (entry,) = client._pools[target]._idle
        assert entry.watching  # settled: its task waits for the socket
        # Borrowed and given back with no checkpoint in between: the watcher
        # has not yet run since the borrow stopped it. That is no reason to
        # close a sound connection.
        async with client.connection(target) as conn:
            assert conn.id == entry.conn.id
        await trio.testing.wait_all_tasks_blocked()
        stats = client.stats(target)
        assert (stats.idle, stats.closed) == (1, 0)
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed) == (1, 2, 0)


async def test_a_peer_close_within_the_settle_time_is_caught_when_lent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def one_reply_then_close(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")

    async with scripted_server(one_reply_then_close) as server, open_client() as client:
        target = target_of(server, timeouts=NO_LIMITS)
        start = trio.current_time()
        assert await client.request(target, b"a") == b"a"
        with trio.fail_after(SETTLE / 2):  # virtual time: only the jumps count
            while server.closed < 1:
                await trio.sleep(SETTLE / 100)
        assert trio.current_time() - start < SETTLE  # not watched yet
        assert client.stats(target).idle == 1
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed, stats.failed) == (2, 0, 1, 0)


async def test_a_pool_wait_is_bounded_by_default(autojump_clock: trio.testing.MockClock) -> None:
    # Timeouts.pool defaults to 30 s: no queue waits for ever unless asked to.
    async with scripted_server(echo) as server, open_client() as client:
        target = target_of(server, max_connections=1, timeouts=Timeouts(connect=None))
        async with client.connection(target):
            start = trio.current_time()
            with pytest.raises(CommTimeout) as info:
                await client.request(target, b"x")
            assert info.value.phase == "pool"
            assert trio.current_time() - start == 30.0
