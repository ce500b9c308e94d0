"""The session wrapper of a service's handler: durations on the run's own clock,
observers of one end of a session only, and the reply unchanged."""

from __future__ import annotations

import struct
from functools import partial
from typing import Any

import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Observer, Server

LOOPBACK = "127.0.0.1"
CODEC = LengthPrefixed()


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def read_frame(stream: trio.abc.Stream) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack_from("!I", data)[0]:
        chunk = await stream.receive_some(4096)
        assert chunk, data
        data += chunk
    return data[4:]


class Starts(Observer):
    def __init__(self) -> None:
        self.started: list[int] = []

    def session_started(self, conn: Connection[Any, Any]) -> None:
        self.started.append(conn.id)


class Durations(Observer):
    def __init__(self) -> None:
        self.ended: list[tuple[float, str | None]] = []

    def session_ended(
        self, conn: Connection[Any, Any], error: BaseException | None, duration: float
    ) -> None:
        self.ended.append((duration, type(error).__name__ if error else None))


async def slow(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    seconds = float(request)
    await trio.sleep(seconds)
    if seconds > 5:
        raise ValueError("too slow")
    return b"took " + request


async def ask(observers: list[Observer], payloads: list[bytes]) -> list[bytes]:
    """Each payload on one connection, in order; the replies (b"" once it closed)."""
    replies = []
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, slow, 0, host=LOOPBACK, codec=CODEC, observers=observers)
        )
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            for payload in payloads:
                await stream.send_all(frame(payload))
                try:
                    replies.append(await read_frame(stream))
                except AssertionError:
                    replies.append(b"")  # the handler failed: the service closed it
        await server.shutdown()
    return replies


async def test_durations_are_measured_on_the_runs_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    durations = Durations()
    replies = await ask([durations], [b"1.5", b"0", b"7"])
    assert replies == [b"took 1.5", b"took 0", b""]
    # The mock clock: exact, however long the run really took.
    assert durations.ended == [(1.5, None), (0.0, None), (7.0, "ValueError")]


async def test_an_observer_of_session_starts_only_sees_each_request() -> None:
    starts = Starts()
    replies = await ask([starts], [b"0", b"0", b"0"])
    assert replies == [b"took 0"] * 3
    assert len(starts.started) == 3
    assert len(set(starts.started)) == 1  # one connection
