"""The connection core's invariants, one test each (see the rules at the top of _connection.py).

* a timer that wakes a read never cuts a write in progress short;
* a write that began and did not complete breaks the connection;
* a service's unwritten replies are bounded in bytes, so a client that never
  reads is held back by TCP;
* ``aclose()`` in a ``serve`` handler writes the replies accepted before it;
* a handler's own ``send`` goes out after the replies accepted before it;
* a reply the codec refuses at the batch's write still lets the earlier ones out.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, ConnState, LengthPrefixed, Server
from triocomm._connection import MAX_REPLY_BYTES

LOOPBACK = "127.0.0.1"
CODEC = LengthPrefixed()


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def tcp_pair() -> tuple[Connection[bytes, bytes], trio.SocketStream]:
    """A Connection on one end of a loopback TCP connection, a raw stream on the other."""
    listener = (await trio.open_tcp_listeners(0, host=LOOPBACK))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        stream = await trio.open_tcp_stream(LOOPBACK, port)
    await listener.aclose()
    return Connection(stream, CODEC), accepted[0]


async def read_frames(stream: trio.abc.ReceiveStream, count: int) -> tuple[list[bytes], bool]:
    """Up to ``count`` whole frames, and whether the peer closed after them."""
    buf = bytearray()
    out: list[bytes] = []
    with trio.fail_after(10):
        while len(out) < count:
            if len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from("!I", buf)[0]:
                size = struct.unpack_from("!I", buf)[0]
                out.append(bytes(buf[4 : 4 + size]))
                del buf[: 4 + size]
                continue
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return out, True
            if not data:
                assert not buf, f"{len(buf)} bytes of a partial frame before the close"
                return out, True
            buf += data
    return out, False


async def test_a_writer_woken_by_a_read_timer_goes_on_writing() -> None:
    # The timers end a read by waking every task blocked on the socket
    # (notify_closing); a writer waiting for room is one of them. While the
    # connection is open it must wait again and finish its message.
    conn, peer = await tcp_pair()
    sock = conn.stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * 4096  # 1 MiB: the peer must read before it fits
    async with conn, peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send, big)
            await trio.testing.wait_all_tasks_blocked()
            assert conn.stats.messages_sent == 0  # blocked part-way
            trio.lowlevel.notify_closing(sock)  # what an expiring read timer does
            await trio.testing.wait_all_tasks_blocked()
            assert conn.state is ConnState.CONNECTED
            frames, closed = await read_frames(peer, 1)
        assert frames == [big]
        assert not closed
        assert conn.stats.messages_sent == 1
        await conn.send(b"after")
        assert await read_frames(peer, 1) == ([b"after"], False)


async def test_a_write_cut_short_by_a_close_leaves_the_connection_in_error() -> None:
    conn, peer = await tcp_pair()
    conn.stream.socket.setsockopt(  # type: ignore[attr-defined]
        socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
    )
    big = b"x" * (1 << 20)
    async with peer:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await conn.send(big)

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            await conn.abort()
        assert conn.state is ConnState.ERROR
        with pytest.raises(trio.ClosedResourceError):
            await conn.send(b"never")


@asynccontextmanager
async def running(handler: Any, codec: Any = CODEC) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, handler, 0, host=LOOPBACK, codec=codec)
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def raw_client(server: Server, rcvbuf: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((LOOPBACK, server.port))
    return trio.SocketStream(sock)


async def test_a_client_that_never_reads_holds_back_the_server() -> None:
    # Tiny pipelined requests for 64 KiB replies, and a client that never
    # reads: the service writes replies once they reach MAX_REPLY_BYTES and
    # reads nothing while they are unwritten, so it answers only what the
    # kernel's buffers take, not a whole burst (256 replies, 16 MiB, before).
    reply = b"r" * 65536

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if conn.seq == 0:
            conn.stream.socket.setsockopt(  # type: ignore[attr-defined]
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
            )
        return reply

    async with running(handler) as server:
        client = await raw_client(server, rcvbuf=4096)
        async with client:
            await client.send_all(frame(b"q") * 2000)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert 1 <= server.stats.sessions < 32
            assert MAX_REPLY_BYTES == 65536


async def test_aclose_in_a_handler_writes_the_earlier_replies_then_closes() -> None:
    # memcached's `quit` after `set` and `get`, all in one write.
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes | None:
        if request == b"quit":
            await conn.aclose()
            return b"ignored: the connection is closed"
        return b"ok " + request

    async with running(handler) as server:
        client = await raw_client(server)
        async with client:
            await client.send_all(frame(b"set") + frame(b"get") + frame(b"quit") + frame(b"x"))
            assert await read_frames(client, 4) == ([b"ok set", b"ok get"], True)
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.005)
        assert server.stats.sessions == 3  # nothing after quit was handled
        assert not server.stats.errors


async def test_a_handlers_own_send_goes_out_after_the_replies_before_it() -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"push":
            await conn.send(b"pushed")
        return b"re " + request

    async with running(handler) as server:
        client = await raw_client(server)
        async with client:
            await client.send_all(frame(b"a") + frame(b"push") + frame(b"b"))
            frames, _ = await read_frames(client, 4)
        assert frames == [b"re a", b"pushed", b"re push", b"re b"]


async def test_a_reply_over_max_frame_in_a_batch_lets_the_earlier_replies_out() -> None:
    # LengthPrefixed encodes a batch at once; the refused reply is found at
    # the write, and the replies before it still go out.
    codec = LengthPrefixed(max_frame=1000)

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        return b"z" * 2000 if request == b"big" else request

    async with running(handler, codec) as server:
        client = await raw_client(server)
        async with client:
            await client.send_all(frame(b"a") + frame(b"b") + frame(b"big") + frame(b"c"))
            assert await read_frames(client, 4) == ([b"a", b"b"], True)
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.005)
        assert server.stats.errors == {"handler": 1}


async def test_flush_in_a_handler_sends_the_earlier_replies_before_it_goes_on() -> None:
    release = trio.Event()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"slow":
            await conn.flush()  # "a" goes out now, not with the batch
            await release.wait()
        return b"re " + request

    async with running(handler) as server:
        client = await raw_client(server)
        async with client:
            await client.send_all(frame(b"a") + frame(b"slow") + frame(b"b"))
            assert await read_frames(client, 1) == ([b"re a"], False)
            release.set()
            assert await read_frames(client, 2) == ([b"re slow", b"re b"], False)


async def test_flush_outside_a_batch_is_a_checkpoint() -> None:
    conn, peer = await tcp_pair()
    async with conn, peer:
        with trio.testing.assert_checkpoints():
            await conn.flush()
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await conn.flush()
        assert conn.state is ConnState.CONNECTED
