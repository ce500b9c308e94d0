"""The service hooks ``on_connect`` / ``on_close``: every way a connection ends.

``on_close`` must run exactly once for every connection that reached the
``on_connect`` point, after it is closed, with ``error`` None for a routine
end and the exception otherwise; a connection that failed before (its TLS
handshake) reaches neither hook. Clients are raw Trio streams.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trustme

import triocomm
from triocomm import CommTimeout, Connection, LengthPrefixed, Server, ServerTimeouts

CODEC = LengthPrefixed(max_frame=1024)
LOOPBACK = "127.0.0.1"


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


class Hooks:
    """Records every hook call; ``closed`` is set once as many connections closed as opened."""

    def __init__(self, greeting: bytes | None = None) -> None:
        self.greeting = greeting
        self.connected: list[Connection[Any, Any]] = []
        self.closes: list[tuple[Connection[Any, Any], BaseException | None, bool]] = []
        self.reject: BaseException | None = None
        self.close_in_on_connect = False
        self.all_closed = trio.Event()

    async def on_connect(self, conn: Connection[bytes, bytes]) -> None:
        self.connected.append(conn)
        if self.greeting is not None:
            await conn.send(self.greeting)
        if self.close_in_on_connect:
            await conn.aclose()
        if self.reject is not None:
            raise self.reject

    def on_close(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        self.closes.append((conn, error, conn.is_closed))
        if len(self.closes) >= len(self.connected):
            self.all_closed.set()

    async def settled(self, count: int = 1) -> list[BaseException | None]:
        """Wait for ``count`` closes; check each was once, after its close; their errors."""
        with trio.fail_after(60):
            while len(self.closes) < count:
                await self.all_closed.wait()
                self.all_closed = trio.Event()
        conns = [conn for conn, _, _ in self.closes]
        assert len(set(map(id, conns))) == len(conns)  # once each
        assert {id(conn) for conn in conns} <= {id(conn) for conn in self.connected}
        assert all(was_closed for _, _, was_closed in self.closes)
        return [error for _, error, _ in self.closes]


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    if request == b"boom":
        raise ValueError("handler failed")
    return request


async def echo_connection(conn: Connection[bytes, bytes]) -> None:
    async for message in conn:
        if message == b"boom":
            raise ValueError("handler failed")
        await conn.send(message)


@asynccontextmanager
async def running(
    hooks: Hooks,
    handler: Callable[..., Awaitable[Any]] = echo,
    *,
    entry: Callable[..., Awaitable[None]] = triocomm.serve,
    **options: Any,
) -> AsyncIterator[tuple[Server, trio.Nursery]]:
    options.setdefault("codec", CODEC)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                entry,
                handler,
                0,
                host=LOOPBACK,
                on_connect=hooks.on_connect,
                on_close=hooks.on_close,
                **options,
            )
        )
        yield server, nursery
        nursery.cancel_scope.cancel()


async def connect(server: Server) -> trio.SocketStream:
    return await trio.open_tcp_stream(LOOPBACK, server.port)


async def read_frame(stream: trio.abc.Stream) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack_from("!I", data)[0]:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data[4:]


async def closed_by_server(stream: trio.abc.Stream) -> bool:
    try:
        return await stream.receive_some(4096) == b""
    except trio.BrokenResourceError:
        return True


@pytest.mark.parametrize("entry", [triocomm.serve, triocomm.serve_connections])
async def test_the_server_speaks_first_and_a_peer_close_is_routine(
    entry: Callable[..., Awaitable[None]],
) -> None:
    hooks = Hooks(greeting=b"220 hello")
    handler = echo if entry is triocomm.serve else echo_connection
    async with running(hooks, handler, entry=entry) as (server, _):
        async with await connect(server) as stream:
            assert await read_frame(stream) == b"220 hello"
            await stream.send_all(frame(b"ping"))
            assert await read_frame(stream) == b"ping"
        assert await hooks.settled() == [None]
        assert server.stats.sessions == 1
        assert not server.stats.errors


@pytest.mark.parametrize("entry", [triocomm.serve, triocomm.serve_connections])
async def test_a_handler_error_reaches_on_close_as_itself(
    entry: Callable[..., Awaitable[None]],
) -> None:
    hooks = Hooks()
    handler = echo if entry is triocomm.serve else echo_connection
    async with running(hooks, handler, entry=entry) as (server, _):
        async with await connect(server) as stream:
            await stream.send_all(frame(b"boom"))
            assert await closed_by_server(stream)
        (error,) = await hooks.settled()
        assert isinstance(error, ValueError)
        assert str(error) == "handler failed"
        assert server.stats.errors == {"handler": 1}


async def test_bad_input_and_timeouts_reach_on_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = Hooks()
    timeouts = ServerTimeouts(first_request=10)
    async with running(hooks, timeouts=timeouts) as (server, _):
        async with await connect(server) as oversized:
            await oversized.send_all(struct.pack("!I", 10_000))
            assert await closed_by_server(oversized)
        async with await connect(server) as silent:
            assert await closed_by_server(silent)
        first, second = await hooks.settled(2)
        assert isinstance(first, triocomm.FrameTooLarge)
        assert isinstance(second, CommTimeout)
        assert second.phase == "first_request"
        assert server.stats.errors == {"frame_too_large": 1, "timeout": 1}


async def test_keepalive_expiry_is_routine(autojump_clock: trio.testing.MockClock) -> None:
    hooks = Hooks()
    async with running(hooks, timeouts=ServerTimeouts(keepalive=10)) as (server, _):
        async with await connect(server) as stream:
            await stream.send_all(frame(b"1"))
            assert await read_frame(stream) == b"1"
            assert await closed_by_server(stream)
        assert await hooks.settled() == [None]


async def test_on_connect_rejects_by_raising_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Hooks()
    hooks.reject = PermissionError("not you")
    calls: list[bytes] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        calls.append(request)
        return request

    async with running(hooks, handler) as (server, _):
        async with await connect(server) as stream:
            await stream.send_all(frame(b"x"))
            assert await closed_by_server(stream)
        (error,) = await hooks.settled()
        assert error is hooks.reject
        assert server.stats.errors == {"on_connect": 1}
        assert server.stats.sessions == 0
        assert calls == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "triocomm.server"]
    assert "on_connect raised" in line
    assert "127.0.0.1:" in line


async def test_on_connect_rejects_by_closing_and_counts_nothing() -> None:
    hooks = Hooks(greeting=b"421 busy")
    hooks.close_in_on_connect = True
    async with running(hooks) as (server, _):
        async with await connect(server) as stream:
            assert await read_frame(stream) == b"421 busy"
            assert await closed_by_server(stream)
        assert await hooks.settled() == [None]
        assert not server.stats.errors
        assert server.stats.sessions == 0


async def test_on_connect_reads_are_bound_by_the_first_request_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handshake(conn: Connection[bytes, bytes]) -> None:
        await conn.receive()

    closes: list[BaseException | None] = []
    options = {"on_connect": handshake, "on_close": lambda conn, error: closes.append(error)}
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve,
                echo,
                0,
                host=LOOPBACK,
                codec=CODEC,
                timeouts=ServerTimeouts(first_request=10),
                **options,
            )
        )
        async with await connect(server) as stream:
            assert await closed_by_server(stream)
        with trio.fail_after(5):
            while not closes:
                await trio.sleep(0.01)
        (error,) = closes
        assert isinstance(error, CommTimeout)
        assert server.stats.errors == {"timeout": 1}
        nursery.cancel_scope.cancel()


async def test_eviction_is_routine() -> None:
    hooks = Hooks()
    async with running(hooks, max_connections=1) as (server, _), await connect(server) as old:
        await old.send_all(frame(b"1"))
        assert await read_frame(old) == b"1"
        async with await connect(server) as new:
            await new.send_all(frame(b"2"))
            with trio.fail_after(5):
                assert await read_frame(new) == b"2"
            assert await closed_by_server(old)
            assert await hooks.settled() == [None]


async def test_shutdown_reaches_on_close_for_waiting_and_busy_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hooks = Hooks()
    entered = trio.Event()

    async def slow(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"slow":
            entered.set()
            await trio.sleep_forever()
        return request

    async with running(hooks, slow) as (server, _nursery):
        idle, busy = await connect(server), await connect(server)
        await idle.send_all(frame(b"1"))
        assert await read_frame(idle) == b"1"
        await busy.send_all(frame(b"slow"))
        await entered.wait()
        await server.shutdown(grace=10)
        errors = await hooks.settled(2)
        assert errors[0] is None  # the idle one, closed between requests
        assert isinstance(errors[1], trio.Cancelled)  # cut mid-request by the grace period
        await idle.aclose()
        await busy.aclose()


async def test_cancelling_the_service_reaches_on_close() -> None:
    hooks = Hooks()
    async with trio.open_nursery() as outer:
        async with running(hooks) as (server, nursery):
            stream = await connect(server)
            await stream.send_all(frame(b"1"))
            assert await read_frame(stream) == b"1"
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert await hooks.settled() == [None]
    await stream.aclose()


async def test_a_failed_tls_handshake_reaches_neither_hook() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOOPBACK).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    hooks = Hooks()
    async with running(hooks, ssl_context=server_context) as (server, _):
        async with await connect(server) as plain:
            await plain.send_all(b"GET / HTTP/1.0\r\n\r\n")
            assert await closed_by_server(plain)
        tls = trio.SSLStream(await connect(server), client_context, server_hostname=LOOPBACK)
        async with tls:
            await tls.send_all(frame(b"secure"))
            assert await read_frame(tls) == b"secure"
        assert await hooks.settled() == [None]
        assert len(hooks.connected) == 1
        assert server.stats.errors == {"handshake": 1}


async def test_an_on_close_error_is_logged_and_swallowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def on_close(conn: Connection[Any, Any], error: BaseException | None) -> None:
        raise RuntimeError("cleanup failed")

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, echo, 0, host=LOOPBACK, codec=CODEC, on_close=on_close)
        )
        for _ in range(2):
            async with await connect(server) as stream:
                await stream.send_all(frame(b"x"))
                assert await read_frame(stream) == b"x"
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 2
    assert all("cleanup failed" in line and "127.0.0.1:" in line for line in lines)


@pytest.mark.parametrize("hook", ["on_connect", "on_close"])
async def test_a_hook_that_is_not_callable_is_refused(hook: str) -> None:
    with pytest.raises(TypeError, match=hook):
        await triocomm.serve(echo, 0, host=LOOPBACK, codec=CODEC, **{hook: "nope"})


async def test_a_bad_proxy_header_or_a_denied_client_reaches_neither_hook() -> None:
    hooks = Hooks()
    async with running(hooks, proxy_protocol=True) as (server, _):
        async with await connect(server) as garbage:
            await garbage.send_all(b"GET / HTTP/1.0\r\n\r\n")
            assert await closed_by_server(garbage)
        async with await connect(server) as proxied:
            await proxied.send_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 80\r\n" + frame(b"x"))
            assert await read_frame(proxied) == b"x"
        assert await hooks.settled() == [None]
        assert hooks.connected[0].remote_address == ("192.0.2.7", 5000)
        assert server.stats.errors == {"proxy_protocol": 1}
    hooks = Hooks()
    async with running(hooks, deny=["127.0.0.0/8"]) as (server, _):
        async with await connect(server) as denied:
            assert await closed_by_server(denied)
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.01)
        assert hooks.connected == []
        assert hooks.closes == []
        assert server.stats.errors == {"denied": 1}
