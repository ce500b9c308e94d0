"""Timers: read limits of many connections kept by one task, not a cancel scope per read.

The behaviour users see (which phase times out, and when) is tested with the
client and the server; here: that the timers are what enforce it, that a
connection costs them at most one live alarm however many reads it makes,
that closed connections do not pile up in them, that without running timers
a connection falls back to a cancel scope, and the alarm rules of ``Timers``.
"""

from __future__ import annotations

import math
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

import triocomm
import triocomm._connection
from triocomm import CommTimeout, Connection, LengthPrefixed, ServerTimeouts, Target, Timeouts
from triocomm._timeouts import Limits
from triocomm._timers import _SWEEP_MIN, Timers

CODEC = LengthPrefixed()


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    return request


async def silent_server(
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections and never answer (nor close) them."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, hold, listeners))
        task_status.started(port)


def no_cancel_scopes(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the deadline of every cancel scope that Connection makes."""
    made: list[float] = []
    real = trio.CancelScope

    def spy(*args: object, **kwargs: object) -> trio.CancelScope:
        frame = sys._getframe(1)
        if frame.f_code.co_name == "__init__" and frame.f_back is not None:
            frame = frame.f_back  # a PhaseLimit's scope belongs to whoever made it
        if frame.f_code.co_filename == triocomm._connection.__file__:
            made.append(kwargs.get("deadline", math.inf))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trio, "CancelScope", spy)
    return made


@pytest.mark.parametrize(
    ("timeouts", "phase", "limit"),
    [(Timeouts(first_response=3.0), "first_response", 3.0), (None, "inactivity", 10.0)],
    ids=["first_response", "default inactivity"],
)
async def test_a_client_read_limit_is_kept_by_the_timers(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    timeouts: Timeouts | None,
    phase: str,
    limit: float,
) -> None:
    made = no_cancel_scopes(monkeypatch)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(silent_server)
        target = Target("127.0.0.1", port, CODEC, timeouts=timeouts)
        async with triocomm.open_client() as client:
            start = trio.current_time()
            with pytest.raises(CommTimeout) as info:
                await client.request(target, b"anyone?")
            assert (info.value.phase, info.value.limit) == (phase, limit)
            assert trio.current_time() - start == pytest.approx(limit)
            # The wait had no cancel scope of its own: the timers woke it.
            assert [d for d in made if d != math.inf] == []
            assert client.stats(target).open == 0  # a timeout closes the connection
        nursery.cancel_scope.cancel()


async def test_one_live_alarm_per_connection_however_many_reads() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(triocomm.serve, echo, host="127.0.0.1", port=0, codec=CODEC)
        )
        target = Target("127.0.0.1", server.port, CODEC)
        async with triocomm.open_client() as client:
            for i in range(200):
                assert await client.request(target, b"%d" % i) == b"%d" % i
            # Each side: one connection, so one alarm each (an alarm is
            # moved on only when it comes due, never pushed per read).
            assert len(client._timers) <= 1
            assert len(server._timers) <= 1
        nursery.cancel_scope.cancel()


async def test_alarms_of_closed_connections_are_swept() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(triocomm.serve, echo, host="127.0.0.1", port=0, codec=CODEC)
        )
        target = Target("127.0.0.1", server.port, CODEC, timeouts=Timeouts(keepalive=0))
        cycles = 6 * _SWEEP_MIN
        async with triocomm.open_client() as client:
            for _ in range(cycles):
                assert await client.request(target, b"x") == b"x"
                # Every connection is closed after its reply: the heaps hold
                # dead alarms only, and no more than a sweep allows.
                assert len(client._timers) <= 2 * _SWEEP_MIN + 2
                assert len(server._timers) <= 2 * _SWEEP_MIN + 2
        nursery.cancel_scope.cancel()


async def test_server_keepalive_limit_closes_an_idle_connection_via_the_timers(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = no_cancel_scopes(monkeypatch)
    timeouts = ServerTimeouts(keepalive=7.0)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(triocomm.serve, echo, host="127.0.0.1", port=0, codec=CODEC, timeouts=timeouts)
        )
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        conn: Connection[bytes, bytes] = Connection(stream, CODEC)
        await conn.send(b"hi")
        assert await conn.receive() == b"hi"
        replied = trio.current_time()
        with pytest.raises(trio.EndOfChannel):
            await conn.receive()  # the server closes the idle connection
        assert trio.current_time() - replied == pytest.approx(7.0)
        assert [d for d in made if d != math.inf] == []
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_without_a_running_timers_a_cancel_scope_keeps_the_limit(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = no_cancel_scopes(monkeypatch)
    a, b = socket.socketpair()
    with a, b:
        conn: Connection[bytes, bytes] = Connection(
            trio.SocketStream(trio.socket.from_stdlib_socket(a)), CODEC
        )
        conn._attach(Timers())  # never started
        conn._set_state(conn.state, Limits(inactivity=2.0))
        start = trio.current_time()
        with pytest.raises(CommTimeout) as info:
            await conn.receive()
        assert info.value.phase == "inactivity"
        assert trio.current_time() - start == pytest.approx(2.0)
        assert made
        assert made[0] == pytest.approx(start + 2.0)
        await conn.aclose()


@asynccontextmanager
async def watched_pair(
    inactivity: float,
) -> AsyncIterator[tuple[Timers, Connection[bytes, bytes], Connection[bytes, bytes], trio.Nursery]]:
    """A running timers, a connection it times (``inactivity``) and its peer, in a nursery."""
    a, b = socket.socketpair()
    with a, b:
        async with trio.open_nursery() as nursery:
            timers = Timers()
            await nursery.start(timers.run)
            conn: Connection[bytes, bytes] = Connection(
                trio.SocketStream(trio.socket.from_stdlib_socket(a)), CODEC
            )
            conn._attach(timers)
            conn._set_state(conn.state, Limits(inactivity=inactivity))
            peer: Connection[bytes, bytes] = Connection(
                trio.SocketStream(trio.socket.from_stdlib_socket(b.dup())), CODEC
            )
            yield timers, conn, peer, nursery
            await peer.aclose()
            await conn.aclose()
            nursery.cancel_scope.cancel()
    assert not timers.running


async def test_a_wait_that_ends_before_its_alarm_is_not_timed_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The alarm comes due after the read got its data: it is dropped, nothing breaks."""
    async with watched_pair(inactivity=5.0) as (timers, conn, peer, nursery):

        async def answer_later() -> None:
            await trio.sleep(4.0)
            await peer.send(b"in time")

        nursery.start_soon(answer_later)
        assert await conn.receive() == b"in time"
        assert len(timers) == 1  # the alarm is still set, for 5 s after the wait began
        await trio.sleep(10.0)  # it comes due and is dropped
        assert len(timers) == 0
        assert not conn.is_closed
        # The next wait gets a fresh alarm and times out on its own schedule.
        start = trio.current_time()
        with pytest.raises(CommTimeout):
            await conn.receive()
        assert trio.current_time() - start == pytest.approx(5.0)


async def test_a_cancelled_wait_leaves_no_alarm_that_could_break_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair(inactivity=5.0) as (timers, conn, peer, _):
        with trio.move_on_after(2.0) as scope:
            await conn.receive()
        assert scope.cancelled_caught
        assert conn._wait_deadline == math.inf  # nothing is waiting any more
        await trio.sleep(10.0)  # the alarm comes due: dropped, the connection untouched
        assert len(timers) == 0
        assert not conn.is_closed
        await peer.send(b"later")
        assert await conn.receive() == b"later"


async def test_a_later_wait_moves_the_alarm_instead_of_adding_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with watched_pair(inactivity=5.0) as (timers, conn, peer, nursery):

        async def talk() -> None:
            for i in range(60):
                await trio.sleep(0.25)  # each within the limit; 15 s in all
                await peer.send(b"%d" % i)

        nursery.start_soon(talk)
        start = trio.current_time()
        for i in range(60):
            assert await conn.receive() == b"%d" % i
            assert len(timers) <= 1
        assert trio.current_time() - start == pytest.approx(15.0)


async def test_a_wait_shorter_than_the_live_alarm_arms_an_earlier_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection arms the timers only for a deadline before its live alarm's,
    and keeps track of that alarm when it fires and is set again for later."""
    async with watched_pair(inactivity=60.0) as (timers, conn, peer, nursery):

        async def talk() -> None:
            await trio.sleep(10.0)
            await peer.send(b"at 10")  # the alarm set at 0 for 60 stays
            await trio.sleep(55.0)
            await peer.send(b"at 65")  # the alarm fired at 60, set again for 70

        nursery.start_soon(talk)
        assert await conn.receive() == b"at 10"
        assert await conn.receive() == b"at 65"
        assert len(timers) == 1
        conn._set_state(conn.state, Limits(inactivity=2.0))
        start = trio.current_time()
        with pytest.raises(CommTimeout):
            await conn.receive()
        assert trio.current_time() - start == pytest.approx(2.0)  # not at 70


class Recorder:
    """An alarm target that records when it was looked at and asks again as told."""

    def __init__(self, following: list[float]) -> None:
        self.seen: list[float] = []
        self.following = following

    def _on_alarm(self, now: float) -> float:
        self.seen.append(now)
        return self.following.pop(0) if self.following else math.inf


async def test_an_alarm_keeps_the_earliest_time_and_fires_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        timers = Timers()
        await nursery.start(timers.run)
        target = Recorder([])
        start = trio.current_time()
        timers.arm(target, start + 5)
        timers.arm(target, start + 3)  # earlier: replaces the 5 s alarm
        timers.arm(target, start + 9)  # later: the 3 s alarm already comes first
        await trio.sleep(20)
        assert target.seen == [pytest.approx(start + 3)]
        nursery.cancel_scope.cancel()


async def test_a_target_asks_to_be_looked_at_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        timers = Timers()
        await nursery.start(timers.run)
        start = trio.current_time()
        target = Recorder([start + 2, start + 7])
        timers.arm(target, start + 1)
        await trio.sleep(20)
        assert target.seen == [pytest.approx(start + t) for t in (1, 2, 7)]
        assert len(timers) == 0
        nursery.cancel_scope.cancel()


async def test_a_disarmed_target_is_never_called_and_swept() -> None:
    timers = Timers()
    targets = [Recorder([]) for _ in range(4 * _SWEEP_MIN)]
    for target in targets:
        timers.arm(target, 100.0)
    for target in targets:
        timers.disarm(target)
    assert len(timers) <= _SWEEP_MIN + 1
    timers._fire(1000.0)
    assert all(not target.seen for target in targets)


async def test_a_target_asking_for_a_past_time_does_not_starve_other_tasks() -> None:
    ticks = 0
    seen_at_tick: list[int] = []

    class Insistent:
        """Always asks to be looked at again at once (a misbehaving target)."""

        def _on_alarm(self, now: float) -> float:
            seen_at_tick.append(ticks)
            return now if len(seen_at_tick) < 20 else math.inf

    async with trio.open_nursery() as nursery:
        timers = Timers()
        await nursery.start(timers.run)
        timers.arm(Insistent(), trio.current_time())
        for _ in range(200):  # bounded: another task that wants to run
            await trio.lowlevel.checkpoint()
            ticks += 1
        nursery.cancel_scope.cancel()
    assert len(seen_at_tick) == 20
    # Other tasks ran between two looks: the looks are spread over the ticks.
    assert len(set(seen_at_tick)) > 1
