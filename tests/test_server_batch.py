"""Batched replies: the codec's optional ``encode_batch`` and the server's burst loop.

``Connection.send_many`` encodes a batch with one call to the codec's
``encode_batch`` when the codec has one, and with ``encode`` per message when
it does not; the server answers a pipelined burst through it. These tests pin
down that both paths send the same bytes in one write, refuse a bad message
before anything is written, and that the per-request bookkeeping of a burst
(``conn.seq``, ``Server.stats.sessions``) is exact at every handler call, also
when the burst ends in a failure.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, ConnState, LengthPrefixed, Server
from triocomm._framing import Buffer, LengthPrefixedDecoder

try:
    from .test_connection import counted_pair
except ImportError:
    from test_connection import counted_pair

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class PlainCodec:
    """A user codec with only the required methods (no ``encode_batch``)."""

    max_frame: int = 1024

    def encode(self, message: Buffer) -> bytes:
        return LengthPrefixed(max_frame=self.max_frame).encode(message)

    def decoder(self) -> LengthPrefixedDecoder:
        return LengthPrefixed(max_frame=self.max_frame).decoder()


@dataclass(frozen=True)
class SpyCodec:
    """A codec with ``encode_batch`` that records which encoder was called."""

    calls: list[str] = field(default_factory=list, compare=False, hash=False)

    def encode(self, message: Buffer) -> bytes:
        self.calls.append("encode")
        return LengthPrefixed().encode(message)

    def encode_batch(self, messages: Sequence[Buffer]) -> bytes:
        self.calls.append(f"encode_batch({len(messages)})")
        return LengthPrefixed().encode_batch(messages)

    def decoder(self) -> LengthPrefixedDecoder:
        return LengthPrefixed().decoder()


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


# -- Connection.send_many ------------------------------------------------------------


async def test_send_many_uses_the_codecs_batch_encoder() -> None:
    codec = SpyCodec()
    client, server, writes = counted_pair(codec)
    await client.send_many([b"a", b"bc", b""])
    assert codec.calls == ["encode_batch(3)"]
    # A single message needs no batch: encode alone, no extra copy.
    await client.send_many([b"d"])
    assert codec.calls == ["encode_batch(3)", "encode"]
    assert len(writes) == 2
    assert [await server.receive() for _ in range(4)] == [b"a", b"bc", b"", b"d"]
    assert (client.stats.messages_sent, client.stats.bytes_sent) == (4, 4 * 4 + 4)


async def test_a_codec_without_encode_batch_still_sends_many_in_one_write() -> None:
    client, server, writes = counted_pair(PlainCodec())
    # Any iterable, not only a list.
    await client.send_many(m for m in [b"one", b"two", b"three"])
    assert len(writes) == 1
    assert [await server.receive() for _ in range(3)] == [b"one", b"two", b"three"]
    assert client.stats.messages_sent == 3


@pytest.mark.parametrize("codec", [LengthPrefixed(), PlainCodec()], ids=["batch", "plain"])
async def test_a_bad_message_in_a_batch_sends_nothing(codec: Any) -> None:
    client, server, writes = counted_pair(codec)
    with pytest.raises(TypeError, match="not str"):
        await client.send_many([b"ok", "text", b"never"])
    assert writes == []
    assert client.stats.bytes_sent == 0
    assert client.state is ConnState.CONNECTED
    await client.send_many([b"after", b"wards"])
    assert [await server.receive() for _ in range(2)] == [b"after", b"wards"]


async def test_batched_bytes_do_not_change_when_the_messages_do() -> None:
    # The batch is a fresh bytes object: mutating the senders' buffers after
    # send_many returned cannot alter what the peer receives.
    client, server, _ = counted_pair(LengthPrefixed())
    messages = [bytearray(b"first"), bytearray(b"second")]
    await client.send_many(messages)
    for m in messages:
        m[:] = b"X" * len(m)
    assert [await server.receive() for _ in range(2)] == [b"first", b"second"]


# -- the server's burst loop ---------------------------------------------------------


@asynccontextmanager
async def running(
    handler: Callable[..., Awaitable[Any]], codec: Any = None
) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, handler, 0, host=LOOPBACK, codec=codec or LengthPrefixed())
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def open_client(server: Server) -> trio.SocketStream:
    return await trio.open_tcp_stream(LOOPBACK, server.port)


async def read_replies(stream: trio.abc.Stream, count: int) -> tuple[list[bytes], bool]:
    """Read up to ``count`` frames; also say whether the server closed after them."""
    buf = bytearray()
    out: list[bytes] = []
    with trio.fail_after(5):
        while True:
            while len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from("!I", buf)[0]:
                size = struct.unpack_from("!I", buf)[0]
                out.append(bytes(buf[4 : 4 + size]))
                del buf[: 4 + size]
            if len(out) >= count:
                return out, False
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return out, True
            if not data:
                return out, True
            buf += data


async def settled(server: Server) -> None:
    with trio.fail_after(5):
        while server.stats.connections_open:
            await trio.sleep(0.005)


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    return request


@pytest.mark.parametrize("codec", [LengthPrefixed(), PlainCodec()], ids=["batch", "plain"])
async def test_a_burst_is_answered_in_order_in_one_write(codec: Any, writes: list[int]) -> None:
    async with running(echo, codec) as server:
        client = await open_client(server)
        requests = [b"%d" % i * (i % 7) for i in range(40)]
        await client.send_all(b"".join(frame(r) for r in requests))
        assert await read_replies(client, 40) == (requests, False)
        assert writes == [sum(len(frame(r)) for r in requests)]
        await client.aclose()


async def test_seq_and_sessions_are_exact_at_every_request_of_a_burst() -> None:
    seen: list[tuple[int, int]] = []
    server_box: list[Server] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        seen.append((conn.seq, server_box[0].stats.sessions))
        return request

    async with running(handler) as server:
        server_box.append(server)
        client = await open_client(server)
        await client.send_all(frame(b"first"))
        assert await read_replies(client, 1) == ([b"first"], False)
        burst = [b"r%d" % i for i in range(20)]
        await client.send_all(b"".join(frame(r) for r in burst))
        assert await read_replies(client, 20) == (burst, False)
        assert seen == [(i, i + 1) for i in range(21)]
        assert server.stats.sessions == 21
        await client.aclose()


async def test_a_handler_failing_mid_burst_delivers_the_earlier_replies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conns: list[Connection[bytes, bytes]] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conns.append(conn)
        if request == b"boom":
            raise RuntimeError("handler bug")
        return request

    caplog.set_level(logging.INFO, logger="triocomm")
    async with running(handler) as server:
        client = await open_client(server)
        burst = [b"a", b"b", b"boom", b"never", b"seen"]
        await client.send_all(b"".join(frame(r) for r in burst))
        assert await read_replies(client, 5) == ([b"a", b"b"], True)
        await settled(server)
        # Requests after the failing one were never handed to the handler.
        assert server.stats.sessions == 3
        assert len(conns) == 3
        assert server.stats.errors == {"handler": 1}
        assert conns[0].state is ConnState.ERROR
        await client.aclose()


@pytest.mark.parametrize("codec", [LengthPrefixed(), PlainCodec()], ids=["batch", "plain"])
async def test_an_unencodable_reply_in_a_burst_fails_the_connection(codec: Any) -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> Any:
        return "text" if request == b"bad" else request

    async with running(handler, codec) as server:
        client = await open_client(server)
        await client.send_all(b"".join(frame(r) for r in [b"a", b"bad", b"c"]))
        # The replies before the refused one are written, then the
        # connection closes: the requests after it are not handled.
        assert await read_replies(client, 3) == ([b"a"], True)
        await settled(server)
        assert server.stats.sessions == 2
        assert server.stats.errors == {"handler": 1}
        await client.aclose()


class Box:
    """A message that can be watched with a weak reference (bytes cannot)."""

    __slots__ = ("__weakref__", "data")

    def __init__(self, data: bytes) -> None:
        self.data = data


class BoxDecoder:
    def __init__(self) -> None:
        self.inner = LengthPrefixed().decoder()

    def feed(self, data: Buffer) -> list[Box]:
        return [Box(m) for m in self.inner.feed(data)]

    @property
    def buffered(self) -> int:
        return self.inner.buffered


@dataclass(frozen=True)
class BoxCodec:
    def encode(self, message: Box) -> bytes:
        return LengthPrefixed().encode(message.data)

    def decoder(self) -> BoxDecoder:
        return BoxDecoder()


async def test_a_waiting_connection_holds_no_request_or_reply() -> None:
    # Requests and replies are let go before the keep-alive wait: what the
    # connection's task holds while idle is held per idle connection.
    refs: list[weakref.ref[Box]] = []

    async def handler(request: Box, conn: Connection[Box, Box]) -> Box:
        refs.append(weakref.ref(request))
        reply = Box(request.data.upper())
        refs.append(weakref.ref(reply))
        return reply

    async with running(handler, BoxCodec()) as server:
        client = await open_client(server)
        await client.send_all(frame(b"one"))
        assert await read_replies(client, 1) == ([b"ONE"], False)
        await client.send_all(frame(b"a") + frame(b"b") + frame(b"c"))
        assert await read_replies(client, 3) == ([b"A", b"B", b"C"], False)
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        assert len(refs) == 8
        assert [r() for r in refs] == [None] * 8
        await client.aclose()


def _triocomm_frames(coro: Any) -> list[Any]:
    """The frames of triocomm's own coroutines in a suspended task's await chain."""
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None and "triocomm" in frame.f_code.co_filename:
            frames.append(frame)
        coro = getattr(coro, "cr_await", None)
    return frames


async def test_a_waiting_connection_holds_no_bound_method() -> None:
    # What the frames of a waiting connection's task hold is held per idle
    # connection, and a bound method is 64 bytes: the request loop calls
    # the connection's methods through conn instead of keeping them.
    async with running(echo) as server:
        client = await open_client(server)
        await client.send_all(frame(b"one"))
        assert await read_replies(client, 1) == ([b"one"], False)
        await trio.testing.wait_all_tasks_blocked()
        tasks = [
            task
            for task in server._service.child_tasks
            if task.coro.cr_code.co_name == "_connection_task"
        ]
        assert len(tasks) == 1
        frames = _triocomm_frames(tasks[0].coro)
        names = [f.f_code.co_name for f in frames]
        assert names == ["_connection_task", "__call__", "receive"], names
        held = [
            (f.f_code.co_name, name)
            for f in frames
            for name, value in f.f_locals.items()
            if isinstance(value, types.MethodType)
        ]
        assert held == []
        await client.aclose()


async def test_a_reply_the_kernel_takes_in_part_arrives_whole_and_counted() -> None:
    # The request loop writes a round's replies at once when the kernel
    # takes them whole; when it takes only part, the rest is written as
    # room frees up. A small send buffer and a client that reads late make
    # the second case certain.
    big = bytes(range(256)) * 4096  # 1 MiB, every byte position told apart
    conns: list[Connection[bytes, bytes]] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if not conns:
            conns.append(conn)
            sock = conn.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return big[: int(request)]

    async with running(handler) as server:
        client = await open_client(server)
        await client.send_all(frame(b"1048576") + frame(b"3"))
        await trio.sleep(0.05)  # the server's first write fills its buffer
        with trio.fail_after(10):
            replies, closed = await read_replies(client, 2)
        assert not closed
        assert replies == [big, big[:3]]
        (conn,) = conns
        with trio.fail_after(5):
            while conn.stats.messages_sent < 2:
                await trio.sleep(0.01)
        assert conn.stats.bytes_sent == len(frame(big)) + len(frame(big[:3]))
        await client.aclose()


async def test_a_peer_that_resets_during_a_reply_written_in_part_is_counted_lost() -> None:
    # The rest of a reply the kernel took only part of is written as room
    # frees up; a peer that resets meanwhile ends that connection as lost,
    # and the service goes on answering others.
    big = bytes(range(256)) * 4096
    started = trio.Event()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"big":
            sock = conn.stream.socket  # type: ignore[attr-defined]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            started.set()
            return big
        return request

    async with running(handler) as server:
        client = await open_client(server)
        await client.send_all(frame(b"big"))
        await started.wait()
        assert len(await client.receive_some(1000)) > 0  # part of the reply came
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # a reset, with most of the reply unsent
        await settled(server)
        assert server.stats.errors["connection_lost"] == 1
        other = await open_client(server)
        await other.send_all(frame(b"still here"))
        assert await read_replies(other, 1) == ([b"still here"], False)
        await other.aclose()
