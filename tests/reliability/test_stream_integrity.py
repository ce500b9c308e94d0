"""A read deadline never cuts a write: reproductions of the two known desynchronisations.

A connection's read limits are kept by the service's timer. When a read's
deadline passes in the very scheduler round in which its data arrives, the
read goes on (its data is there) while the timer acts on the expiry. The
timer must then leave alone a write in progress on the same connection from
another task: cutting it, and going on with the connection, puts the next
message straight after half of the previous one.

Each test runs episodes on real loopback TCP with a ``MockClock`` that only
moves when told: a large write waits part-way (the peer, a raw socket with a
small receive buffer, does not read), then the peer sends a message and the
clock jumps past the read's deadline in the same step, so that the data and
the expiry land in one scheduler round. Trio runs the tasks of a round in an
order it randomises, so an episode meets the race about half the time;
``EPISODES`` episodes make a miss on broken code negligible (the peer reads
only after that round: its reads would open the window and wake the writer,
a third task in the race that hides it most of the time). Then the clock
autojumps, the peer reads to the end, and every byte must parse as whole
messages that were sent, then nothing or a close (``wire.problems``).
"""

from __future__ import annotations

import functools
import math
import socket
from typing import Any

import pytest
import trio
import trio.testing
from wire import CODEC, SendLog, Wire, describe, drain, frame, problems, raw_peer

import triocomm

# Episodes per test: a broken core escapes all of them about once in 2**EPISODES runs.
EPISODES = 16
# The clock's periods (mock seconds): the idle period of the heartbeat, and
# the read limit that expires while a request arrives.
IDLE = 1.0
LIMIT = 10.0
# Large enough to fill the peer's small window and the kernel's buffers.
BIG = 1024 * 1024


class Episode:
    """One connection's messages and the service-side connection they went over."""

    def __init__(self) -> None:
        self.log = SendLog()
        self.conn: triocomm.Connection[Any, Any] | None = None
        self.big_started = False

    def failed(self) -> bool:
        return self.conn is not None and self.conn.state is triocomm.ConnState.ERROR


async def race(clock: trio.testing.MockClock, port: int, episode: Episode, request: bytes) -> Wire:
    """Make a write wait, then land a request and the read's expiry in one round; read all."""
    clock.autojump_threshold = math.inf
    raw = raw_peer(port)
    sock = trio.socket.from_stdlib_socket(raw)
    with sock:
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(IDLE)  # the service starts its large write, and waits for room
        await trio.testing.wait_all_tasks_blocked()
        assert episode.big_started, "the large write did not start"
        assert episode.log.attempts[0].outcome == "running", "the large write did not wait"
        # No schedule point from here to the jump: the request is readable
        # and the deadline passed when the scheduler next looks.
        raw.send(frame(request))
        raw.shutdown(socket.SHUT_WR)
        clock.jump(LIMIT)
        # Read only after that round (see the module's docstring).
        await trio.testing.wait_all_tasks_blocked()
        clock.autojump_threshold = 0
        with trio.fail_after(10 * LIMIT):
            wire = await drain(sock)
    # Let the service finish closing before its connection's state is read.
    await trio.testing.wait_all_tasks_blocked()
    return wire


def verdict(episodes: list[tuple[Wire, Episode]]) -> None:
    bad = []
    for number, (wire, episode) in enumerate(episodes):
        found = problems(wire, episode.log, failed=episode.failed())
        if found:
            bad.append(f"episode {number}: {'; '.join(found)} [{describe(wire, episode.log)}]")
    assert not bad, f"{len(bad)} of {len(episodes)} episodes broke the stream:\n" + "\n".join(bad)


async def test_a_heartbeat_cut_by_a_read_deadline_is_never_followed_by_a_reply(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # serve + on_idle: no user code shares the connection, the service's own
    # heartbeat task and request loop do.
    current = Episode()

    async def heartbeat(conn: triocomm.Connection[Any, Any], status: triocomm.Idle) -> None:
        if current.big_started:
            return  # one heartbeat per connection: the race needs just one
        current.big_started = True
        await current.log.send(conn, current.log.payload("beat", BIG))

    async def answer(request: bytes, conn: triocomm.Connection[Any, Any]) -> bytes:
        current.conn = conn
        reply = current.log.payload("reply", 100)
        current.log.expect([reply])
        return reply

    timeouts = triocomm.ServerTimeouts(first_request=LIMIT, keepalive=LIMIT, inactivity=None)
    server: triocomm.Server = await nursery.start(
        functools.partial(
            triocomm.serve,
            answer,
            0,
            host="127.0.0.1",
            codec=CODEC,
            timeouts=timeouts,
            idle={triocomm.Idle.READ: IDLE},
            on_idle=heartbeat,
        )
    )
    episodes = []
    for _ in range(EPISODES):
        current = Episode()
        wire = await race(mock_clock, server.port, current, b"request")
        episodes.append((wire, current))
    verdict(episodes)


async def test_b_a_push_cut_by_the_readers_deadline_is_never_followed_by_an_echo(
    mock_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    # serve_connections: the handler reads in one task and pushes a large
    # message from another, a common shape for streaming services. The
    # pushing task tolerates a failed push (it logs and gives up, as user
    # code may); then the connection must be closed, so the echo fails too.
    current = Episode()

    async def push(conn: triocomm.Connection[Any, Any], episode: Episode) -> None:
        episode.big_started = True
        try:
            await episode.log.send(conn, episode.log.payload("push", BIG))
        except (triocomm.CommError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handler(conn: triocomm.Connection[Any, Any]) -> None:
        episode = current
        episode.conn = conn
        async with trio.open_nursery() as tasks:
            # Read first: the push starts only when the clock moves.
            tasks.start_soon(later, push, conn, episode)
            async for message in conn:
                await episode.log.send(conn, episode.log.payload("echo", len(message)))

    async def later(fn: Any, *args: Any) -> None:
        await trio.sleep(IDLE)
        await fn(*args)

    timeouts = triocomm.ServerTimeouts(first_request=LIMIT, keepalive=LIMIT, inactivity=None)
    server: triocomm.Server = await nursery.start(
        functools.partial(
            triocomm.serve_connections,
            handler,
            0,
            host="127.0.0.1",
            codec=CODEC,
            timeouts=timeouts,
        )
    )
    episodes = []
    for _ in range(EPISODES):
        current = Episode()
        wire = await race(mock_clock, server.port, current, b"message")
        episodes.append((wire, current))
    verdict(episodes)


@pytest.mark.parametrize("cut", [1, 2, 5, 1000])
def test_the_wire_check_catches_bytes_after_a_cut_message(cut: int) -> None:
    # The check itself can fail: half of a message and then a whole one is
    # reported, and a whole stream with a cut last message is not.
    log = SendLog()
    first, second = log.payload("beat", 4000), log.payload("reply", 50)
    log.expect([first, second])
    cut_then_whole = frame(first)[:cut] + frame(second)
    assert problems(Wire(cut_then_whole, "eof"), log, failed=True)
    assert not problems(Wire(frame(first) + frame(second)[:cut], "reset"), log, failed=True)
