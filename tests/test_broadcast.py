"""Managed connections: ``Server.connections`` and ``Server.broadcast``.

A broadcast reaches every reader while peers that never read are closed as
slow consumers after the send limit, without holding the others back. The
clock is Trio's MockClock (autojump): it moves only when every task waits
and no socket is ready, so readers are never cut as slow by a busy machine.
"""

from __future__ import annotations

import socket
import struct
from functools import partial

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Server, ServerTimeouts
from triocomm.testing import open_fd_count

CODEC = LengthPrefixed()
LOOPBACK = "127.0.0.1"
# Send within 5 s (Trio clock); no keep-alive limit while peers just listen.
TIMEOUTS = ServerTimeouts(send=5.0, keepalive=None, first_request=None)
MESSAGE = bytes(range(256)) * 128  # 32 KiB: more than a tiny socket buffer pair holds


async def listen(conn: Connection[bytes, bytes]) -> None:
    async for _ in conn:
        pass


async def reader(stream: trio.SocketStream, got: list[bytes]) -> None:
    data = bytearray()
    while len(data) < 4 + len(MESSAGE):
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        data += chunk
    (size,) = struct.unpack_from("!I", data)
    got.append(bytes(data[4 : 4 + size]))


async def read_to_end(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass  # reset: the server closed with the message unsent
    return bytes(data)


async def tiny_buffered_peer(port: int) -> trio.SocketStream:
    """A peer whose receive buffer is as small as the kernel allows."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    await sock.connect((LOOPBACK, port))
    return trio.SocketStream(sock)


async def broadcast_to(readers: int, sleepers: int) -> None:
    before = open_fd_count()
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(
                triocomm.serve_connections,
                listen,
                0,
                host=LOOPBACK,
                codec=CODEC,
                timeouts=TIMEOUTS,
                max_connections=readers + sleepers,
            )
        )
        awake = [await trio.open_tcp_stream(LOOPBACK, server.port) for _ in range(readers)]
        asleep = [await tiny_buffered_peer(server.port) for _ in range(sleepers)]
        with trio.fail_after(60):
            while len(server.connections) < readers + sleepers:
                await trio.sleep(0.01)
        # Small server-side send buffers for the sleepers' connections too.
        sleeper_ports = {stream.socket.getsockname()[1] for stream in asleep}
        for conn in server.connections:
            if conn.remote_address[1] in sleeper_ports:  # type: ignore[index]
                conn.stream.socket.setsockopt(  # type: ignore[attr-defined]
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 1024
                )
        got: list[bytes] = []
        async with trio.open_nursery() as readers_nursery:
            for stream in awake:
                readers_nursery.start_soon(reader, stream, got)
            started = trio.current_time()
            with trio.fail_after(60):
                assert await server.broadcast(MESSAGE) == readers
            assert trio.current_time() - started >= TIMEOUTS.send  # the sleepers were waited for
        assert got == [MESSAGE] * readers
        assert server.stats.errors == {"slow_consumer": sleepers}
        with trio.fail_after(60):
            while server.stats.connections_open > readers:
                await trio.sleep(0.01)
        assert len(server.connections) == readers
        for stream in asleep:  # closed by the server, before the whole message
            assert len(await read_to_end(stream)) < 4 + len(MESSAGE)
        for stream in awake + asleep:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert open_fd_count() == before


async def test_broadcast_reaches_readers_and_closes_slow_consumers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await broadcast_to(readers=3, sleepers=2)


async def test_broadcast_refuses_a_request_reply_service() -> None:
    async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        return request

    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, echo, 0, host=LOOPBACK, codec=CODEC)
        )
        with pytest.raises(RuntimeError, match="serve_connections"):
            await server.broadcast(b"x")
        nursery.cancel_scope.cancel()


async def test_broadcast_refuses_a_message_the_codec_cannot_encode() -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve_connections, listen, 0, host=LOOPBACK, codec=CODEC)
        )
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            with trio.fail_after(5):
                while not server.connections:
                    await trio.sleep(0.01)
            with pytest.raises(TypeError):
                await server.broadcast("not bytes")
            assert server.stats.errors == {}
            assert len(server.connections) == 1
            assert await server.broadcast(b"") == 1
            assert await stream.receive_some(10) == b"\0\0\0\0"
        nursery.cancel_scope.cancel()


async def test_connections_is_a_snapshot_of_open_connections_oldest_first() -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve_connections, listen, 0, host=LOOPBACK, codec=CODEC)
        )
        assert server.connections == []
        first = await trio.open_tcp_stream(LOOPBACK, server.port)
        second = await trio.open_tcp_stream(LOOPBACK, server.port)
        with trio.fail_after(5):
            while len(server.connections) < 2:
                await trio.sleep(0.01)
        snapshot = server.connections
        assert [conn.id for conn in snapshot] == sorted(conn.id for conn in snapshot)
        await first.aclose()
        with trio.fail_after(5):
            while len(server.connections) > 1:
                await trio.sleep(0.01)
        assert len(snapshot) == 2  # a snapshot: it does not change
        assert server.connections == [snapshot[1]]
        await second.aclose()
        nursery.cancel_scope.cancel()
