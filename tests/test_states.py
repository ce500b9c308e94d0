"""The state tables of triocomm._states against the state changes the code makes.

The docs draw the client and server state machines from those tables, so a
table that drifts from the code would draw a wrong picture. These tests
record every write of ``Connection._state`` (a property installed on the
class for the test's duration logs each change and keeps the value aside)
while real client and server sessions run: keep-alive reuse, pipelining,
borrowed connections, failures, timeouts and closes. Every change seen must be
a listed transition, and every main transition of a table must be seen.

The client runs against a scripted server that speaks the codec without
triocomm, and the service against raw sockets, so every ``Connection`` in a
test is on the side under test.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import triocomm
from test_client_peers import Peer, echo, scripted_server
from triocomm import ConnState, LengthPrefixed, ServerTimeouts, Target, Timeouts
from triocomm._states import CLIENT, CLIENT_TIMELINE, SERVER, SERVER_TIMELINE, Transition

CODEC = LengthPrefixed()
HEADER = struct.Struct("!I")
NO_LIMITS = Timeouts(connect=None, inactivity=None, keepalive=None)
Edge = tuple[ConnState, ConnState]


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class StateLog:
    """Every change of ``Connection._state`` while installed, as (old, new) pairs."""

    def __init__(self) -> None:
        self.values: dict[int, ConnState] = {}
        self.seen: set[Edge] = set()
        self.keep: list[object] = []  # keeps ids unique while the log lives

    def get(self, conn: object) -> ConnState:
        return self.values[id(conn)]

    def set(self, conn: object, new: ConnState) -> None:
        old = self.values.get(id(conn))
        if old is None:
            self.keep.append(conn)
            assert new is ConnState.CONNECTED, f"a connection was born {new.name}"
        elif old is not new:
            self.seen.add((old, new))
        self.values[id(conn)] = new


@pytest.fixture
def states(monkeypatch: pytest.MonkeyPatch) -> StateLog:
    log = StateLog()
    monkeypatch.setattr(triocomm.Connection, "_state", property(log.get, log.set), raising=False)
    return log


def edges(
    table: tuple[Transition, ...], kinds: tuple[str, ...] = ("main", "close", "failure")
) -> set[Edge]:
    return {(t.source, t.target) for t in table if t.kind in kinds}


def names(found: set[Edge]) -> list[str]:
    return sorted(f"{old.name} -> {new.name}" for old, new in found)


# -- the tables themselves ---------------------------------------------------------


@pytest.mark.parametrize("table", [CLIENT, SERVER], ids=["client", "server"])
def test_tables_follow_their_own_rules(table: tuple[Transition, ...]) -> None:
    for t in table:
        assert t.source not in (ConnState.ERROR, ConnState.CLOSED), t  # final states
        assert t.source is not ConnState.CONNECTING, t  # no Connection is ever in it
        assert t.target is not ConnState.CONNECTING, t
        assert (t.kind == "failure") == (t.target is ConnState.ERROR), t
        assert t.kind in ("main", "close", "failure"), t
        assert t.label, t
    assert len(edges(table)) == len(table), "an edge is listed twice"


@pytest.mark.parametrize(
    ("timeline", "fields"),
    [(CLIENT_TIMELINE, Timeouts), (SERVER_TIMELINE, ServerTimeouts)],
    ids=["client", "server"],
)
def test_timelines_name_every_limit_once(timeline: tuple, fields: type) -> None:
    moments, spans = timeline
    moment_names = [m.name for m in moments]
    assert len(set(moment_names)) == len(moment_names)
    for span in spans:
        assert moment_names.index(span.start) < moment_names.index(span.end), span
    limits = [span.limit for span in spans]
    # rate_grace is no limit of its own: the rate spans' notes name it.
    named = [f.name for f in dataclasses.fields(fields) if f.name != "rate_grace"]
    assert sorted(limits) == sorted(named)


# -- client sessions ------------------------------------------------------------------


async def _client_sessions(autojump_clock: trio.testing.MockClock) -> None:
    async def garbage_reply(peer: Peer) -> None:
        await peer.read_frame()
        await peer.send_raw(b"\xff\xff\xff\xff")  # a header far past max_frame
        await peer.wait_eof()

    async def silent(peer: Peer) -> None:
        await peer.wait_eof()

    async def reply_then_close(peer: Peer) -> None:
        await peer.send_frame(await peer.read_frame() or b"")
        await peer.close()

    async def reply_with_extra(peer: Peer) -> None:
        payload = await peer.read_frame() or b""
        await peer.send_raw(frame(payload) + frame(b"unasked"))
        await peer.wait_eof()

    async with scripted_server(echo) as server, triocomm.open_client(timeouts=NO_LIMITS) as client:
        target = Target("127.0.0.1", server.port, CODEC)
        # Keep-alive reuse: the second request borrows the first's connection.
        assert await client.request(target, b"a") == b"a"
        assert await client.request(target, b"b") == b"b"
        # A borrowed connection, pipelined requests on it, and a run().
        async with client.connection(target) as conn:
            await conn.send_many([b"1", b"2", b"3"])
            assert [await conn.receive() for _ in range(3)] == [b"1", b"2", b"3"]

        async def two(conn: triocomm.Connection[bytes, bytes]) -> bytes:
            await conn.send(b"x")
            return await conn.receive()

        assert await client.run(target, two) == b"x"
        # Requests that wait for the only connection get it straight from the last.
        one = Target("127.0.0.1", server.port, CODEC, max_connections=1)
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(client.request, one, b"%d" % i)
        # A session that fails on a connection handed straight to it.
        release = trio.Event()

        async def hold() -> None:
            async with client.connection(one):
                await release.wait()

        async def fail() -> None:
            with pytest.raises(RuntimeError):
                async with client.connection(one):
                    raise RuntimeError("the session failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(fail)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        # A connection the user closes inside the block.
        async with client.connection(target) as conn:
            await conn.aclose()
        # A cancelled session.
        with trio.move_on_after(1):
            async with client.connection(target) as conn:
                await trio.sleep_forever()
        # Keep-alive 0: closed after its session.
        await client.request(target, b"k", timeouts=NO_LIMITS.replace(keepalive=0))
        # Keep-alive time runs out in the pool.
        short = Target("127.0.0.1", server.port, CODEC, timeouts=NO_LIMITS.replace(keepalive=5))
        await client.request(short, b"s")
        await trio.sleep(10)
        # Leaving open_client closes the idle connections.

    async with triocomm.open_client(timeouts=NO_LIMITS) as client:
        for script, error in [
            (garbage_reply, triocomm.FrameTooLarge),
            (reply_with_extra, None),
        ]:
            async with scripted_server(script) as server:
                target = Target("127.0.0.1", server.port, CODEC)
                if error is None:
                    await client.request(target, b"q")
                else:
                    with pytest.raises(error):
                        await client.request(target, b"q")
        async with scripted_server(silent) as server:
            target = Target("127.0.0.1", server.port, CODEC)
            with pytest.raises(triocomm.CommTimeout):
                await client.request(target, b"q", timeouts=NO_LIMITS.replace(first_response=3))
        # A pooled connection whose peer closed: found out on reuse.
        async with scripted_server(reply_then_close) as server:
            target = Target("127.0.0.1", server.port, CODEC)
            await client.request(target, b"r")
            await trio.testing.wait_all_tasks_blocked()
            await client.request(target, b"r")


async def test_client_changes_state_only_as_the_table_says(
    states: StateLog, autojump_clock: trio.testing.MockClock
) -> None:
    await _client_sessions(autojump_clock)
    assert names(states.seen - edges(CLIENT)) == []
    # Every edge the docs draw is one the code takes.
    assert names(edges(CLIENT) - states.seen) == []


# -- server sessions ------------------------------------------------------------------


async def _handler(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes | None:
    if request == b"raise":
        raise RuntimeError("the handler failed")
    if request == b"quiet":
        return None
    return request


async def _stream_handler(conn: triocomm.Connection[bytes, bytes]) -> None:
    async for message in conn:
        if message == b"bye":
            return
        await conn.send(message)


async def _read(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return bytes(data)


@asynccontextmanager
async def _service(
    nursery: trio.Nursery, serve: object, handler: object, timeouts: ServerTimeouts
) -> AsyncIterator[triocomm.Server]:
    server: triocomm.Server = await nursery.start(
        functools.partial(serve, handler, 0, host="127.0.0.1", codec=CODEC, timeouts=timeouts)  # type: ignore[operator]
    )
    yield server
    await server.shutdown(grace=1)


async def _server_sessions() -> None:
    timeouts = ServerTimeouts(first_request=5, keepalive=20, inactivity=None)
    async with trio.open_nursery() as nursery:
        async with _service(nursery, triocomm.serve, _handler, timeouts) as server:
            port = server.port
            assert port is not None
            # Keep-alive and pipelining, then a clean close by the client.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(frame(b"a"))
            assert await _read(stream, 5) == frame(b"a")
            await stream.send_all(frame(b"b") + frame(b"quiet") + frame(b"c"))
            assert await _read(stream, 10) == frame(b"b") + frame(b"c")
            await stream.aclose()
            # A client that connects and leaves without a word.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
            # Bad bytes, and a handler that raises.
            for data in (b"\xff\xff\xff\xff", frame(b"raise")):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(data)
                assert await _read(stream, 1) == b""
                await stream.aclose()
            # Silence past first_request, and past keepalive.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            assert await _read(stream, 1) == b""
            await stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(frame(b"d"))
            assert await _read(stream, 6) == frame(b"d") + b""
            assert await _read(stream, 1) == b""
            await stream.aclose()
            # A connection idle between requests when the service shuts down.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            await idle.send_all(frame(b"e"))
            assert await _read(idle, 5) == frame(b"e")
        assert await _read(idle, 1) == b""
        await idle.aclose()
        async with _service(
            nursery, triocomm.serve_connections, _stream_handler, timeouts
        ) as server:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(frame(b"f") + frame(b"bye"))
            assert await _read(stream, 6) == frame(b"f") + b""
            await stream.aclose()


async def test_server_changes_state_only_as_the_table_says(
    states: StateLog, autojump_clock: trio.testing.MockClock
) -> None:
    await _server_sessions()
    assert names(states.seen - edges(SERVER)) == []
    assert names(edges(SERVER) - states.seen) == []
