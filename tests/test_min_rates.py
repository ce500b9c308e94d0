"""A service's minimum data rates: ``ServerTimeouts.min_receive_rate``,
``min_send_rate`` and ``rate_grace``, which end a trickling (slowloris) peer.

Once ``rate_grace`` has passed since a message began, its average rate so far
must stay at or above the minimum. Tested on a connection under a service's
limits, both ways a wait is timed (the timers on a plain socket, a cancel
scope on other streams), then through a running service. All on a MockClock.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import CommTimeout, Connection, ConnState, LengthPrefixed, Server, ServerTimeouts
from triocomm._timeouts import passive_limits
from triocomm._timers import Timers

CODEC = LengthPrefixed()
LOOPBACK = "127.0.0.1"
# The defaults, spelt out: the figures below follow from them.
RATE, GRACE = 240, 5.0
DEFAULT = ServerTimeouts()
Pair = tuple[Connection[bytes, bytes], trio.abc.Stream]


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


@asynccontextmanager
async def timed_pair(timeouts: ServerTimeouts, kind: str) -> AsyncIterator[Pair]:
    """A connection under a service's limits (between requests) and its peer's raw stream.

    ``kind``: ``"socket"`` (a socket pair, waits timed by a running
    :class:`Timers`, as a service's are) or ``"memory"`` (a memory stream,
    waits timed by a cancel scope each).
    """
    _, limits = passive_limits(timeouts)
    async with trio.open_nursery() as nursery:
        if kind == "socket":
            a, b = socket.socketpair()
            ours: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
            peer: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        else:
            ours, peer = trio.testing.memory_stream_pair()
        conn: Connection[bytes, bytes] = Connection(ours, CODEC)
        timers = Timers()
        await nursery.start(timers.run)
        conn._attach(timers)
        conn._set_state(ConnState.KEEPALIVE, limits)
        try:
            yield conn, peer
        finally:
            await conn.aclose()
            await trio.aclose_forcefully(peer)
            nursery.cancel_scope.cancel()


KINDS = pytest.mark.parametrize("kind", ["socket", "memory"])


async def send_paced(peer: trio.abc.Stream, data: bytes, size: int, interval: float) -> None:
    """Send ``data`` in pieces of ``size`` bytes, one every ``interval`` seconds
    (the first at once), until done or the other side is gone."""
    try:
        for offset in range(0, len(data), size):
            if offset:
                await trio.sleep(interval)
            await peer.send_all(data[offset : offset + size])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def cut_after(conn: Connection[bytes, bytes], start: float) -> tuple[CommTimeout, float]:
    """Receive until the connection raises its timeout; that and when, from ``start``."""
    with pytest.raises(CommTimeout) as info:
        await conn.receive()
    assert conn.state is ConnState.ERROR
    assert conn.is_closed
    return info.value, trio.current_time() - start


# -- receiving ---------------------------------------------------------------------


@KINDS
async def test_a_trickling_request_is_cut_when_the_grace_ends(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with timed_pair(DEFAULT, kind) as (conn, peer), trio.open_nursery() as nursery:
        # A byte a second: the inactivity limit (10 s) never sees a stall.
        nursery.start_soon(send_paced, peer, frame(b"x" * 100), 1, 1.0)
        error, after = await cut_after(conn, trio.current_time())
    assert (error.phase, error.limit) == ("receive_rate", RATE)
    assert after == pytest.approx(GRACE)
    assert "receive_rate timeout: slower than 240 bytes/s" in str(error)


@KINDS
@pytest.mark.parametrize(("per_second", "cut"), [(300, False), (200, True)])
async def test_a_steady_transfer_is_cut_only_below_the_minimum(
    autojump_clock: trio.testing.MockClock, kind: str, per_second: int, cut: bool
) -> None:
    payload = b"s" * 12_000  # 40 s at 300 bytes a second, 60 s at 200
    async with timed_pair(DEFAULT, kind) as (conn, peer), trio.open_nursery() as nursery:
        nursery.start_soon(send_paced, peer, frame(payload), per_second // 10, 0.1)
        start = trio.current_time()
        if not cut:
            assert await conn.receive() == payload
            assert trio.current_time() - start == pytest.approx(40, abs=0.2)
            assert not conn.is_closed
            return
        error, after = await cut_after(conn, start)
    assert error.phase == "receive_rate"
    # 200 bytes a second is below the minimum from the start: cut once the grace is over.
    assert GRACE <= after <= GRACE + 1


async def slow_start(peer: trio.abc.Stream, data: bytes) -> None:
    try:
        await peer.send_all(data[:1])
        await trio.sleep(GRACE - 0.1)  # 1 byte in 4.9 s: far too slow, but in the grace
        await peer.send_all(data[1:])
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@KINDS
async def test_the_grace_lets_a_message_start_slowly(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    payload = b"g" * 2000
    data = frame(payload)
    async with timed_pair(DEFAULT, kind) as (conn, peer), trio.open_nursery() as nursery:
        nursery.start_soon(slow_start, peer, data)
        assert await conn.receive() == payload
    # A shorter grace cuts the same start.
    shorter = DEFAULT.replace(rate_grace=2)
    async with timed_pair(shorter, kind) as (conn, peer), trio.open_nursery() as nursery:
        nursery.start_soon(slow_start, peer, data)
        error, after = await cut_after(conn, trio.current_time())
    assert error.phase == "receive_rate"
    assert after == pytest.approx(2)


@KINDS
async def test_the_rate_is_checked_within_a_second_of_falling_below(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    # 2400 bytes at once earn 10 s at 240 bytes a second; 2 bytes every 0.5 s
    # then keep the inactivity limit quiet while the average sinks.
    head, tail = b"h" * 2396, b"t" * 1000
    data = frame(head + tail)
    async with timed_pair(DEFAULT, kind) as (conn, peer), trio.open_nursery() as nursery:

        async def burst_then_trickle() -> None:
            await peer.send_all(data[:2400])
            await trio.sleep(0.5)
            await send_paced(peer, data[2400:], 2, 0.5)

        nursery.start_soon(burst_then_trickle)
        error, after = await cut_after(conn, trio.current_time())
    # When the average first fell below the minimum, from what was sent when.
    received = 2400 + 2 * int(after / 0.5)
    breach = received / RATE
    assert error.phase == "receive_rate"
    assert breach <= after <= breach + 1
    assert after > 10  # the burst's credit was spent first


async def test_a_steady_transfer_moves_its_alarm_instead_of_adding_alarms(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The rate's deadline moves later with every byte: the alarm set for the
    # first one comes due while data arrives, finds a later deadline, and
    # moves on; the timers never hold more than one alarm for the connection.
    payload = b"m" * 3000
    async with timed_pair(DEFAULT, "socket") as (conn, peer), trio.open_nursery() as nursery:
        timers = conn._timers
        assert timers is not None
        nursery.start_soon(send_paced, peer, frame(payload), 30, 0.1)  # 300 bytes a second
        most = 0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, len(timers))
                await trio.sleep(0.05)

        nursery.start_soon(watch)
        assert await conn.receive() == payload
        nursery.cancel_scope.cancel()
    # The live alarm, and at most the keep-alive one set before the first byte
    # (dead, swept when it comes due): never one per byte.
    assert 1 <= most <= 2


async def test_an_alarm_due_as_a_byte_arrives_still_cuts_a_slow_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The second byte lands in the instant the rate check comes due: whichever
    # runs first, the average (2 bytes in 5 s) is too slow, and the read ends then.
    async with timed_pair(DEFAULT, "socket") as (conn, peer), trio.open_nursery() as nursery:
        start = trio.current_time()

        async def on_the_dot() -> None:
            await peer.send_all(b"\x00")
            await trio.sleep_until(start + GRACE)
            await peer.send_all(b"\x00")

        nursery.start_soon(on_the_dot)
        error, after = await cut_after(conn, start)
    assert error.phase == "receive_rate"
    assert after == pytest.approx(GRACE)


@KINDS
async def test_none_turns_the_receive_rate_off(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    payload = b"n" * 30  # 34 s at a byte a second
    off = DEFAULT.replace(min_receive_rate=None)
    async with timed_pair(off, kind) as (conn, peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_paced, peer, frame(payload), 1, 1.0)
            assert await conn.receive() == payload
        # Only the progress limit is left: a stall is still cut.
        await peer.send_all(b"\x00")
        error, after = await cut_after(conn, trio.current_time())
    assert (error.phase, after) == ("inactivity", pytest.approx(10))


@KINDS
async def test_waiting_between_requests_is_bound_by_keepalive_only(
    autojump_clock: trio.testing.MockClock, kind: str
) -> None:
    async with timed_pair(DEFAULT, kind) as (conn, peer):
        await trio.sleep(30)  # quiet: no message has begun, so no rate applies
        await peer.send_all(frame(b"late"))
        assert await conn.receive() == b"late"
        error, after = await cut_after(conn, trio.current_time())
    assert (error.phase, after) == ("keepalive", pytest.approx(60))


# -- sending -----------------------------------------------------------------------


@asynccontextmanager
async def lockstep_pair(timeouts: ServerTimeouts) -> AsyncIterator[Pair]:
    """A connection under a service's limits over a stream that buffers nothing."""
    _, limits = passive_limits(timeouts)
    ours, peer = trio.testing.lockstep_stream_pair()
    conn: Connection[bytes, bytes] = Connection(ours, CODEC)
    conn._set_state(ConnState.RECEIVING, limits)
    try:
        yield conn, peer
    finally:
        await conn.aclose()
        await trio.aclose_forcefully(peer)


async def read_paced(peer: trio.abc.Stream, size: int, interval: float) -> int:
    """Read ``size`` bytes every ``interval`` seconds until the end; return the total."""
    total = 0
    try:
        while data := await peer.receive_some(size):
            total += len(data)
            await trio.sleep(interval)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return total


async def send_cut_after(conn: Connection[bytes, bytes], reply: bytes) -> tuple[CommTimeout, float]:
    start = trio.current_time()
    with pytest.raises(CommTimeout) as info:
        await conn.send(reply)
    assert conn.state is ConnState.ERROR
    return info.value, trio.current_time() - start


async def test_a_peer_that_never_reads_is_cut_when_the_grace_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with lockstep_pair(DEFAULT) as (conn, _peer):
        error, after = await send_cut_after(conn, b"r" * 1000)
    assert (error.phase, error.limit, after) == ("send_rate", RATE, pytest.approx(GRACE))
    # With the rate off, the progress limit is what is left.
    async with lockstep_pair(DEFAULT.replace(min_send_rate=None)) as (conn, _peer):
        error, after = await send_cut_after(conn, b"r" * 1000)
    assert (error.phase, after) == ("inactivity", pytest.approx(10))


@pytest.mark.parametrize(("per_second", "cut"), [(300, False), (200, True)])
async def test_a_peer_that_reads_slowly_is_cut_only_below_the_minimum(
    autojump_clock: trio.testing.MockClock, per_second: int, cut: bool
) -> None:
    reply = b"r" * 2996  # 3000 bytes with its header: 10 s at 300 bytes a second
    # Off: on a stream the inactivity limit covers a whole step of a write.
    patient = DEFAULT.replace(inactivity=None)
    async with lockstep_pair(patient) as (conn, peer), trio.open_nursery() as nursery:
        nursery.start_soon(read_paced, peer, per_second // 10, 0.1)
        if not cut:
            await conn.send(reply)
            assert not conn.is_closed
            await conn.aclose()  # the reader's end
            return
        error, after = await send_cut_after(conn, reply)
    # A stream shows no progress inside a write: the write as a whole must keep
    # the rate, 3000 bytes in 12.5 s; at 200 bytes a second it cannot.
    assert (error.phase, after) == ("send_rate", pytest.approx(3000 / RATE))


async def test_a_socket_peer_that_never_reads_is_cut_by_the_rate_of_what_the_kernel_took(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    conn: Connection[bytes, bytes] = Connection(ours, CODEC)
    conn._set_state(ConnState.RECEIVING, passive_limits(DEFAULT.replace(inactivity=None))[1])
    try:
        with trio.fail_after(3600):  # on the mock clock: fail, not hang, without a limit
            error, after = await send_cut_after(conn, b"k" * (4 << 20))
        # What the kernel took is what the peer can still read.
        taken = 0
        while data := await peer.receive_some(1 << 16):
            taken += len(data)
    finally:
        await conn.aclose()
        await peer.aclose()
    assert 0 < taken < 4 << 20
    assert error.phase == "send_rate"
    assert after == pytest.approx(max(GRACE, taken / RATE))


async def test_a_socket_peer_reading_slowly_but_above_the_minimum_gets_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reply = b"q" * 200_000
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    peer = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    conn: Connection[bytes, bytes] = Connection(ours, CODEC)
    conn._set_state(ConnState.RECEIVING, passive_limits(DEFAULT)[1])
    try:
        async with trio.open_nursery() as nursery:
            got: list[int] = []

            async def reader() -> None:
                # 2000 bytes a second: in steps the kernel's buffering can
                # show the writer well within the inactivity limit.
                got.append(await read_paced(peer, 2000, 1.0))

            nursery.start_soon(reader)
            start = trio.current_time()
            await conn.send(reply)
            assert trio.current_time() - start > 50  # the write really was slow
            await conn.aclose()
    finally:
        await conn.aclose()
        await peer.aclose()
    assert got == [len(reply) + 4]


# -- through a service -------------------------------------------------------------


@asynccontextmanager
async def running(
    handler: Callable[..., Awaitable[Any]],
    entry: Callable[..., Awaitable[None]] = triocomm.serve,
    **options: Any,
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(entry, handler, codec=CODEC, host=LOOPBACK, port=0, **options)
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    return request


async def settled(server: Server) -> None:
    """Wait until the service's connection tasks have ended (and reported)."""
    with trio.fail_after(5):
        while server.stats.connections_open:
            await trio.sleep(0.01)


async def closed_after(stream: trio.abc.Stream, start: float) -> float:
    """Read until the service closes ``stream``; when, from ``start``."""
    try:
        while await stream.receive_some(1 << 16):
            pass
    except trio.BrokenResourceError:
        pass
    return trio.current_time() - start


async def test_a_service_cuts_a_trickling_request_and_counts_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "triocomm")
    async with running(echo) as server, trio.open_nursery() as nursery:
        assert server.port is not None
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        async with stream:
            # Connected 8 s ago, under first_request (10 s): the rate counts
            # from the first byte, not from the connect.
            await trio.sleep(8)
            start = trio.current_time()
            nursery.start_soon(send_paced, stream, frame(b"x" * 100), 1, 1.0)
            assert await closed_after(stream, start) == pytest.approx(GRACE)
        await settled(server)
        assert server.stats.errors == {"timeout": 1}
    assert any("receive_rate timeout (limit 240 bytes/s)" in r.getMessage() for r in caplog.records)


async def test_a_service_cuts_a_reader_that_never_reads_and_counts_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "triocomm")
    reply = b"b" * (16 << 20)

    async def big(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        return reply

    codec = LengthPrefixed(max_frame=len(reply))
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, big, codec=codec, host=LOOPBACK, port=0)
        )
        assert server.port is not None
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        async with stream:
            await stream.send_all(frame(b"go"))
            with trio.fail_after(3600):
                while server.stats.errors["timeout"] == 0:
                    await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert server.stats.errors == {"timeout": 1}
    # The kernel's buffers took some of the reply at once, which pays for some
    # seconds of the rate; the progress limit (10 s) may come first.
    messages = [r.getMessage() for r in caplog.records]
    assert any("send_rate timeout" in m or "inactivity timeout" in m for m in messages)


async def test_a_service_keeps_a_quiet_keepalive_connection_and_a_steady_upload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    payload = b"u" * 6000  # 20 s at 300 bytes a second
    async with running(echo) as server, trio.open_nursery() as nursery:
        assert server.port is not None
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        async with stream:
            nursery.start_soon(send_paced, stream, frame(payload), 30, 0.1)
            data = b""
            while len(data) < len(payload) + 4:
                data += await stream.receive_some(1 << 16)
            assert data == frame(payload)
            await trio.sleep(50)  # between requests: keepalive (60 s) alone
            await stream.send_all(frame(b"again"))
            assert await stream.receive_some(1 << 16) == frame(b"again")
    assert server.stats.errors == {}


async def test_serve_connections_applies_the_rates_to_every_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[CommTimeout] = []

    async def handler(conn: Connection[bytes, bytes]) -> None:
        assert await conn.receive() == b"first"
        try:
            await conn.receive()
        except CommTimeout as exc:
            errors.append(exc)

    async with running(handler, entry=triocomm.serve_connections) as server:
        assert server.port is not None
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        async with stream:
            await stream.send_all(frame(b"first"))
            await trio.sleep(30)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_paced, stream, frame(b"x" * 100), 1, 1.0)
                assert await closed_after(stream, start) == pytest.approx(GRACE)
    assert [e.phase for e in errors] == ["receive_rate"]
