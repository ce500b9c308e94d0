"""Observers on clients and services: which events come, in what order, and
that an observer's exception is logged and swallowed.

Services are served to raw Trio streams; clients talk to scripted raw-Trio
servers (``test_client_peers``), so neither side's bugs hide the other's.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Observer, Server, Target, open_client
from triocomm._observe import ObserverSet

try:
    from .test_client_peers import Peer, echo, scripted_server
except ImportError:
    from test_client_peers import Peer, echo, scripted_server

CODEC = LengthPrefixed()
LOOPBACK = "127.0.0.1"


class Recorder(Observer):
    """Every event as a tuple; connections by their id."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def attached(self, source: object) -> None:
        self.events.append(("attached", type(source).__name__))

    def detached(self, source: object) -> None:
        self.events.append(("detached", type(source).__name__))

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        self.events.append(("opened", conn.id))

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        assert conn.is_closed
        self.events.append(("closed", conn.id, type(error).__name__ if error else None))

    def connect_failed(self, address: tuple[str, int] | str, error: BaseException) -> None:
        self.events.append(("connect_failed", address, type(error).__name__))

    def session_started(self, conn: Connection[Any, Any]) -> None:
        self.events.append(("started", conn.id))

    def session_ended(
        self, conn: Connection[Any, Any], error: BaseException | None, duration: float
    ) -> None:
        assert duration >= 0
        self.events.append(("ended", conn.id, type(error).__name__ if error else None))

    def pool_wait(self, target: Any, duration: float) -> None:
        self.events.append(("pool_wait", str(target), duration))

    def retry(self, target: Any, attempt: int, error: BaseException) -> None:
        self.events.append(("retry", str(target), attempt, type(error).__name__))

    def names(self) -> list[str]:
        return [event[0] for event in self.events]


class Broken(Observer):
    """Raises from every event."""

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        raise RuntimeError("opened broke")

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        raise RuntimeError("closed broke")

    def session_started(self, conn: Connection[Any, Any]) -> None:
        raise RuntimeError("started broke")

    def session_ended(
        self, conn: Connection[Any, Any], error: BaseException | None, duration: float
    ) -> None:
        raise RuntimeError("ended broke")


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def read_frame(stream: trio.abc.Stream) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack_from("!I", data)[0]:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data[4:]


async def reply(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    if request == b"boom":
        raise ValueError("handler failed")
    return request


async def wait_for(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.005)


async def run_service(
    entry: Callable[..., Awaitable[None]],
    handler: Callable[..., Awaitable[Any]],
    observers: list[Observer],
    script: Callable[[Server], Awaitable[None]],
) -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(entry, handler, 0, host=LOOPBACK, codec=CODEC, observers=observers)
        )
        await script(server)
        await server.shutdown()


# -- services --------------------------------------------------------------------


async def test_a_service_reports_connections_and_each_request_as_a_session() -> None:
    recorder = Recorder()

    async def script(server: Server) -> None:
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            for payload in (b"a", b"b"):
                await stream.send_all(frame(payload))
                assert await read_frame(stream) == payload
            await stream.send_all(frame(b"boom"))
            assert await stream.receive_some(10) == b""
        await wait_for(lambda: server.stats.connections_open == 0)

    await run_service(triocomm.serve, reply, [recorder], script)
    conn_id = recorder.events[1][1]
    assert recorder.events == [
        ("attached", "Server"),
        ("opened", conn_id),
        ("started", conn_id),
        ("ended", conn_id, None),
        ("started", conn_id),
        ("ended", conn_id, None),
        ("started", conn_id),
        ("ended", conn_id, "ValueError"),
        ("closed", conn_id, "ValueError"),
        ("detached", "Server"),
    ]


async def test_a_connection_service_reports_the_connection_as_one_session() -> None:
    recorder = Recorder()

    async def handler(conn: Connection[bytes, bytes]) -> None:
        async for message in conn:
            await conn.send(message)

    async def script(server: Server) -> None:
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            for payload in (b"a", b"b"):
                await stream.send_all(frame(payload))
                assert await read_frame(stream) == payload
        await wait_for(lambda: server.stats.connections_open == 0)

    await run_service(triocomm.serve_connections, handler, [recorder], script)
    assert recorder.names() == ["attached", "opened", "started", "ended", "closed", "detached"]
    assert recorder.events[4][2] is None


async def test_hooks_and_observers_run_in_lifecycle_order() -> None:
    order: list[str] = []

    class Order(Observer):
        def connection_opened(self, conn: Connection[Any, Any]) -> None:
            order.append("connection_opened")

        def connection_closed(
            self, conn: Connection[Any, Any], error: BaseException | None
        ) -> None:
            order.append("connection_closed")

        def session_started(self, conn: Connection[Any, Any]) -> None:
            order.append("session_started")

        def session_ended(
            self, conn: Connection[Any, Any], error: BaseException | None, duration: float
        ) -> None:
            order.append("session_ended")

    async def on_connect(conn: Connection[Any, Any]) -> None:
        order.append("on_connect")

    def on_close(conn: Connection[Any, Any], error: BaseException | None) -> None:
        order.append("on_close")

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        order.append("handler")
        return request

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve,
                handler,
                0,
                host=LOOPBACK,
                codec=CODEC,
                on_connect=on_connect,
                on_close=on_close,
                observers=[Order()],
            )
        )
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(frame(b"x"))
            assert await read_frame(stream) == b"x"
        await wait_for(lambda: server.stats.connections_open == 0)
        nursery.cancel_scope.cancel()
    assert order == [
        "connection_opened",
        "on_connect",
        "session_started",
        "handler",
        "session_ended",
        "on_close",
        "connection_closed",
    ]


async def test_an_observer_that_raises_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()

    async def script(server: Server) -> None:
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(frame(b"a"))
            assert await read_frame(stream) == b"a"
        await wait_for(lambda: server.stats.connections_open == 0)
        assert not server.stats.errors

    await run_service(triocomm.serve, reply, [Broken(), recorder], script)
    # The observer after the broken one still hears everything.
    assert recorder.names() == [
        "attached",
        "opened",
        "started",
        "ended",
        "closed",
        "detached",
    ]
    lines = [r.getMessage() for r in caplog.records if r.name == "triocomm.observe"]
    assert len(lines) == 4
    for line, what in zip(lines, ("opened", "started", "ended", "closed"), strict=True):
        assert f"{what} broke" in line
        assert "127.0.0.1:" in line
        assert "Broken." in line


async def test_an_observer_of_connections_only_leaves_the_handler_unwrapped() -> None:
    class Connections(Observer):
        def connection_opened(self, conn: Connection[Any, Any]) -> None:
            pass

    assert ObserverSet.of([]) is None
    assert ObserverSet.of(None) is None
    watching = ObserverSet.of([Connections()])
    assert watching is not None
    assert not watching.watches_sessions
    recording = ObserverSet.of([Connections(), Recorder()])
    assert recording is not None
    assert recording.watches_sessions


@pytest.mark.parametrize("observers", [[object()], Recorder(), ["x"]])
async def test_observers_must_be_a_list_of_observers(observers: Any) -> None:
    with pytest.raises(TypeError, match="Observer"):
        await triocomm.serve(reply, 0, host=LOOPBACK, codec=CODEC, observers=observers)
    with pytest.raises(TypeError, match="Observer"):
        open_client(observers=observers)


# -- clients ---------------------------------------------------------------------


async def test_a_client_reports_its_connections_and_sessions() -> None:
    recorder = Recorder()
    async with scripted_server(echo) as server:
        target = Target(LOOPBACK, server.port, CODEC)
        async with open_client(observers=[recorder]) as client:
            assert await client.request(target, b"a") == b"a"
            assert await client.run(target, _exchange) == b"x"
            async with client.connection(target) as conn:
                await conn.send(b"y")
                assert await conn.receive() == b"y"
            conn_id = recorder.events[1][1]
        assert recorder.events == [
            ("attached", "Client"),
            ("opened", conn_id),
            *[("started", conn_id), ("ended", conn_id, None)] * 3,
            ("closed", conn_id, None),
            ("detached", "Client"),
        ]


async def _exchange(conn: Connection[bytes, bytes]) -> bytes:
    await conn.send(b"x")
    return await conn.receive()


async def test_a_client_reports_a_failed_connect() -> None:
    with trio.socket.socket() as sock:
        await sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        recorder = Recorder()
        async with open_client(observers=[recorder]) as client:
            with pytest.raises(triocomm.ConnectError):
                await client.request(Target(LOOPBACK, port, CODEC), b"a")
    assert recorder.events[1] == ("connect_failed", (LOOPBACK, port), "ConnectError")
    assert "opened" not in recorder.names()


async def test_a_client_reports_the_retry_of_a_stale_connection() -> None:
    async def stale_after_one(peer: Peer) -> None:
        if peer.number == 1:
            await peer.send_frame(await peer.read_frame() or b"")
            await peer.read_frame()  # the second request: hang up unanswered
            return
        while (payload := await peer.read_frame()) is not None:
            await peer.send_frame(payload)

    recorder = Recorder()
    async with scripted_server(stale_after_one) as server:
        target = Target(LOOPBACK, server.port, CODEC)
        async with open_client(observers=[recorder]) as client:
            assert await client.request(target, b"a") == b"a"
            assert await client.request(target, b"b") == b"b"
            first, second = recorder.events[1][1], recorder.events[-3][1]
            await wait_for(lambda: ("closed", first, "EndOfChannel") in recorder.events)
    retries = [event for event in recorder.events if event[0] == "retry"]
    assert retries == [("retry", str(target), 2, "ConnectionLost")]
    assert ("ended", first, "EndOfChannel") in recorder.events
    assert ("started", second) in recorder.events


async def test_a_client_reports_a_wait_for_a_pool_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    recorder = Recorder()
    async with scripted_server(echo) as server:
        target = Target(LOOPBACK, server.port, CODEC, max_connections=1)
        async with (
            open_client(observers=[recorder]) as client,
            trio.open_nursery() as nursery,
            client.connection(target),  # released first: then the queued request runs
        ):
            nursery.start_soon(client.request, target, b"queued")
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(3)
    waits = [event for event in recorder.events if event[0] == "pool_wait"]
    assert len(waits) == 1
    assert waits[0][2] >= 3
