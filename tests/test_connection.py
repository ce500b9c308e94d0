"""Connection: a Channel of messages over memory, lockstep, TCP, TLS and Unix streams.

What is proved here: messages cross every kind of stream intact; a clean close
between messages is ``EndOfChannel``, a close or reset in the middle of one is
``ConnectionLost``, our own close is ``ClosedResourceError``; bad input moves the
connection to ``ERROR`` and closes it; statistics are exact; concurrent sends
are serialized FIFO while concurrent receives raise ``BusyResourceError``; the
per-phase limits name their phase; ``idle_time`` follows the clock.
"""

from __future__ import annotations

import array
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from passive import answered
from triocomm import (
    CommError,
    CommTimeout,
    Connection,
    ConnectionLost,
    ConnState,
    FrameTooLarge,
    Idle,
    LengthPrefixed,
    Lines,
    ProtocolError,
    Raw,
)
from triocomm._connection import format_address
from triocomm._timeouts import Limits
from triocomm.testing import connection_pair

# The kinds the conftest's stream_pair fixture makes.
STREAM_KINDS = ("memory", "lockstep", "tcp", "tcp6", "unix", "tls")
SOCKET_KINDS = ("tcp", "tcp6", "unix", "tls")
MakeStreamPair = Callable[[str], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]

CODEC = LengthPrefixed()
# Kinds where a sender does not wait for the receiver (lockstep would block).
BUFFERED_KINDS = [k for k in STREAM_KINDS if k != "lockstep"]

Pair = tuple[Connection[Any, Any], Connection[Any, Any]]


async def connections(make: MakeStreamPair, kind: str, codec: Any = CODEC) -> Pair:
    client, server = await make(kind)
    return Connection(client, codec), Connection(server, codec)


def memory_pair(codec: Any = CODEC, *, lockstep: bool = False) -> Pair:
    make = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    left, right = make()
    return Connection(left, codec), Connection(right, codec)


def counted_pair(codec: Any) -> tuple[Connection[Any, Any], Connection[Any, Any], list[int]]:
    """A connection pair over memory streams; the list counts the left side's writes."""
    left, right = trio.testing.memory_stream_pair()
    writes: list[int] = []
    pump = left.send_stream.send_all_hook

    async def counting_pump() -> None:
        writes.append(1)
        assert pump is not None
        await pump()

    left.send_stream.send_all_hook = counting_pump
    return Connection(left, codec), Connection(right, codec), writes


def socket_of(conn: Connection[Any, Any]) -> trio.socket.SocketType:
    stream = conn.stream
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


# -- messages cross every stream -------------------------------------------------


@pytest.mark.parametrize("kind", STREAM_KINDS)
async def test_messages_cross_every_kind_of_stream(stream_pair: MakeStreamPair, kind: str) -> None:
    client, server = await connections(stream_pair, kind)
    messages = [b"", b"x", bytes(range(256)), b"y" * 300_000]

    async def echo() -> None:
        for _ in messages:
            await server.send(await server.receive())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for message in messages:
            await client.send(message)
            assert await client.receive() == message
    wire = sum(4 + len(m) for m in messages)
    for conn in (client, server):
        assert conn.stats.bytes_sent == conn.stats.bytes_received == wire
        assert conn.stats.messages_sent == conn.stats.messages_received == len(messages)
        assert conn.state is ConnState.CONNECTED
    await client.aclose()
    await server.aclose()


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
async def test_large_message_arrives_whole(stream_pair: MakeStreamPair, kind: str) -> None:
    client, server = await connections(stream_pair, kind)
    payload = bytes(i % 251 for i in range(4 * 1024 * 1024))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send, payload)
        assert await server.receive() == payload
    assert server.stats.bytes_received == len(payload) + 4


async def test_async_iteration_ends_at_clean_close() -> None:
    client, server = memory_pair()
    await server.send_many([b"a", b"b", b"c"])
    await server.aclose()
    assert [m async for m in client] == [b"a", b"b", b"c"]
    assert client.state is ConnState.CONNECTED


async def test_pipelined_burst_is_decoded_once_and_served_in_order() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2", b"3"])
    assert await client.receive() == b"1"
    assert client.pending == 2
    assert not client.between_messages
    assert await client.receive() == b"2"
    assert await client.receive() == b"3"
    assert client.pending == 0
    assert client.between_messages


class _TupleDecoder:
    """A decoder that returns a tuple, not the list the protocol asks for."""

    def __init__(self) -> None:
        self.inner = LengthPrefixed().decoder()

    def feed(self, data: Any) -> Any:
        return tuple(self.inner.feed(data))

    @property
    def buffered(self) -> int:
        return self.inner.buffered


@dataclass(frozen=True)
class _TupleCodec:
    def encode(self, message: bytes) -> bytes:
        return LengthPrefixed().encode(message)

    def decoder(self) -> _TupleDecoder:
        return _TupleDecoder()


async def test_a_burst_is_served_in_order_whatever_sequence_the_decoder_returns() -> None:
    from triocomm._connection import _NO_PENDING

    for codec in (CODEC, _TupleCodec()):
        client, server = memory_pair(codec)
        await server.send_many([b"1", b"2", b"3", b"4"])
        assert await client.receive() == b"1"
        assert client.pending == 3
        assert await client.receive() == b"2"
        assert await answered(client, b"2") == [b"2", b"3", b"4"]
        assert client.pending == 0
        await server.send_many([b"5", b"6"])
        assert [await client.receive(), await client.receive()] == [b"5", b"6"]
        # Drained: the connection holds no list of its own any more.
        assert client._pending is _NO_PENDING
        assert await answered(client, b"7") == [b"7"]
        assert _NO_PENDING == []


@dataclass(frozen=True)
class _TypedViewCodec:
    """Encodes to a view of 4-byte ints, which a codec may return (any buffer)."""

    def encode(self, message: bytes) -> memoryview:
        return memoryview(array.array("I", [len(message)] * 2))

    def decoder(self) -> Any:
        return Raw().decoder()


@pytest.mark.parametrize("kind", BUFFERED_KINDS)
async def test_bytes_sent_counts_bytes_of_a_typed_view(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind, _TypedViewCodec())
    await client.send(b"x")
    await client.send_many([b"y", b"z"])
    size = 2 * array.array("I").itemsize
    assert client.stats.bytes_sent == 3 * size
    assert client.stats.messages_sent == 3
    got = b""
    while len(got) < 3 * size:
        got += await server.receive()
    assert len(got) == 3 * size


async def test_a_round_takes_the_decoded_messages_without_io() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2", b"3"])
    assert await client.receive() == b"1"
    assert await answered(client, b"1") == [b"1", b"2", b"3"]
    assert client.pending == 0


# -- end of stream ---------------------------------------------------------------


@pytest.mark.parametrize("kind", BUFFERED_KINDS)
async def test_clean_close_between_messages_is_end_of_channel(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind)
    await server.send(b"last")
    await server.aclose()
    assert await client.receive() == b"last"
    with pytest.raises(trio.EndOfChannel):
        await client.receive()
    # Asking again gives the same answer, without touching the stream.
    with pytest.raises(trio.EndOfChannel):
        await client.receive()
    assert client.state is ConnState.CONNECTED
    assert not client.is_closed


@pytest.mark.parametrize("kind", BUFFERED_KINDS)
async def test_close_in_the_middle_of_a_message_is_connection_lost(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind)
    await server.stream.send_all(struct.pack("!I", 10) + b"abc")
    await server.aclose()
    with pytest.raises(ConnectionLost, match="middle of a message") as info:
        await client.receive()
    assert isinstance(info.value, trio.BrokenResourceError)
    assert isinstance(info.value, CommError)
    assert client.state is ConnState.ERROR
    assert client.is_closed
    with pytest.raises(trio.ClosedResourceError):
        await client.receive()
    await client.aclose()
    assert client.state is ConnState.ERROR  # ERROR is final


@pytest.mark.parametrize("kind", ["tcp", "tcp6"])
async def test_reset_is_connection_lost(stream_pair: MakeStreamPair, kind: str) -> None:
    client, server = await connections(stream_pair, kind)
    # Linger 0: close sends RST instead of FIN.
    socket_of(server).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.aclose()
    with pytest.raises(ConnectionLost) as info:
        await client.receive()
    assert client.peer in str(info.value)
    assert client.state is ConnState.ERROR


@pytest.mark.parametrize("kind", ["tcp", "tcp6"])
async def test_reset_in_the_middle_of_a_message_is_connection_lost(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind)
    await server.send(b"whole")
    await server.stream.send_all(CODEC.encode(b"never finished")[:7])
    assert await client.receive() == b"whole"
    socket_of(server).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await server.aclose()
    with pytest.raises(ConnectionLost):
        await client.receive()
    assert client.state is ConnState.ERROR
    assert socket_of(client).fileno() == -1


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_sending_to_a_vanished_peer_is_connection_lost(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind)
    await server.aclose()
    with pytest.raises(ConnectionLost):
        # The first writes may still land in kernel buffers; the peer's
        # reset must surface within a bounded number of them.
        for _ in range(200):
            await client.send(b"z" * 65536)
    assert client.state is ConnState.ERROR
    assert socket_of(client).fileno() == -1


async def test_half_close_lets_the_other_direction_continue(
    stream_pair: MakeStreamPair,
) -> None:
    client, server = await connections(stream_pair, "tcp")
    await server.send(b"bye")
    await server.stream.send_eof()  # type: ignore[attr-defined]
    assert [m async for m in client] == [b"bye"]
    await client.send(b"still here")
    assert await server.receive() == b"still here"


# -- our own close -----------------------------------------------------------------


@pytest.mark.parametrize("kind", STREAM_KINDS)
async def test_use_after_our_close_is_closed_resource_error(
    stream_pair: MakeStreamPair, kind: str, tmp_path: Any
) -> None:
    client, _server = await connections(stream_pair, kind)
    await client.aclose()
    assert client.state is ConnState.CLOSED
    assert client.is_closed
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await client.send_many([b"x", b"y"])
    with pytest.raises(trio.ClosedResourceError):
        await client.send_many([])
    with pytest.raises(trio.ClosedResourceError):
        await client.receive()
    path = tmp_path / "f"
    path.write_bytes(b"data")
    with pytest.raises(trio.ClosedResourceError):
        await client.send_file(path)
    await client.aclose()  # idempotent
    assert client.state is ConnState.CLOSED
    if kind in SOCKET_KINDS:
        assert socket_of(client).fileno() == -1


async def test_receive_after_our_close_ignores_already_decoded_messages() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2"])
    assert await client.receive() == b"1"
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive()


@pytest.mark.parametrize("kind", STREAM_KINDS)
async def test_close_while_another_task_receives(stream_pair: MakeStreamPair, kind: str) -> None:
    client, _server = await connections(stream_pair, kind)

    async def receiver() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await client.receive()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await wait_all_tasks_blocked()
        await client.aclose()
    assert client.is_closed


async def test_aclose_lets_a_send_in_progress_finish() -> None:
    client, server = memory_pair(lockstep=True)
    big = b"q" * 500_000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send, big)
        await wait_all_tasks_blocked()
        nursery.start_soon(client.aclose)
        await wait_all_tasks_blocked()
        assert client.state is ConnState.CLOSING
        assert not client.is_closed
        assert await server.receive() == big
    assert client.state is ConnState.CLOSED
    with pytest.raises(trio.EndOfChannel):
        await server.receive()


async def test_cancelled_aclose_still_closes(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = memory_pair(lockstep=True)

    async def stuck_send() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await client.send(b"never read")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck_send)
        await wait_all_tasks_blocked()
        with trio.move_on_after(1):
            await client.aclose()
    assert client.is_closed
    # The close cut the stuck send short: part of a message may be on the
    # wire, so the connection ends in ERROR, not CLOSED.
    assert client.state is ConnState.ERROR


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "tcp", "unix", "tls"])
async def test_oversized_frame_is_an_error_and_closes(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind, LengthPrefixed(max_frame=1000))
    await server.stream.send_all(struct.pack("!I", 1001))
    with pytest.raises(FrameTooLarge) as info:
        await client.receive()
    assert (info.value.size, info.value.limit) == (1001, 1000)
    assert client.state is ConnState.ERROR
    assert client.is_closed
    with pytest.raises(trio.ClosedResourceError):
        await client.receive()
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"x")
    if kind in SOCKET_KINDS:
        assert socket_of(client).fileno() == -1
    # The peer sees the connection go away.
    with pytest.raises((trio.EndOfChannel, ConnectionLost)):
        await server.receive()


async def test_over_long_line_is_an_error() -> None:
    client, server = memory_pair(Lines(max_line=8))
    await server.stream.send_all(b"012345678")
    with pytest.raises(FrameTooLarge):
        await client.receive()
    assert client.state is ConnState.ERROR


class Fussy:
    """A user codec whose decoder raises a plain ValueError on bad input."""

    def encode(self, message: bytes) -> bytes:
        return message

    def decoder(self) -> Any:
        return self

    buffered = 0

    def feed(self, data: Any) -> list[bytes]:
        if b"!" in bytes(data):
            raise ValueError("no shouting")
        return [bytes(data)]


async def test_user_codec_errors_become_protocol_errors() -> None:
    client, server = memory_pair(Fussy())
    await server.send(b"fine")
    assert await client.receive() == b"fine"
    await server.send(b"oops!")
    with pytest.raises(ProtocolError, match="no shouting") as info:
        await client.receive()
    assert isinstance(info.value.__cause__, ValueError)
    assert client.state is ConnState.ERROR


async def test_unencodable_message_leaves_the_connection_usable() -> None:
    client, server = memory_pair()
    with pytest.raises(TypeError):
        await client.send("text")
    with pytest.raises(TypeError):
        await client.send_many([b"ok", 42])
    assert client.state is ConnState.CONNECTED
    assert client.stats.bytes_sent == 0
    await client.send(b"ok")
    assert await server.receive() == b"ok"


# -- statistics and the clock ------------------------------------------------------


async def test_stats_are_exact(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    client, server = memory_pair()
    assert client.stats.created_at == start
    assert client.stats.last_send_at is None
    assert client.stats.last_receive_at is None
    await trio.sleep(1)
    await client.send(b"abc")
    assert client.stats.last_send_at == start + 1
    await trio.sleep(1)
    await client.send_many([b"d", b"ef"])
    assert (client.stats.bytes_sent, client.stats.messages_sent) == (7 + 5 + 6, 3)
    await trio.sleep(1)
    assert [await server.receive() for _ in range(3)] == [b"abc", b"d", b"ef"]
    stats = server.stats
    assert (stats.bytes_received, stats.messages_received) == (18, 3)
    assert stats.last_receive_at == start + 3
    assert (stats.bytes_sent, stats.messages_sent) == (0, 0)
    assert client.stats.last_send_at == start + 2


async def test_send_many_is_one_write() -> None:
    client, server, writes = counted_pair(CODEC)
    await client.send_many([b"a", b"b", b"c", b"d"])
    assert len(writes) == 1
    await client.send_many([])
    assert len(writes) == 1
    assert client.stats.messages_sent == 4
    assert [await server.receive() for _ in range(4)] == [b"a", b"b", b"c", b"d"]


async def test_idle_time_follows_reads_and_writes(autojump_clock: trio.testing.MockClock) -> None:
    client, server = memory_pair()
    await trio.sleep(5)
    assert client.idle_time(Idle.READ) == 5
    assert client.idle_time(Idle.WRITE) == 5
    assert client.idle_time() == client.idle_time(Idle.BOTH) == 5
    await client.send(b"ping")
    await trio.sleep(3)
    assert client.idle_time(Idle.WRITE) == 3
    assert client.idle_time(Idle.READ) == 8
    assert client.idle_time(Idle.BOTH) == 3
    await server.send(b"pong")
    await trio.sleep(1)
    assert await client.receive() == b"pong"
    await trio.sleep(2)
    # BOTH counts from the later of the last read and the last write.
    assert client.idle_time(Idle.READ) == 2
    assert client.idle_time(Idle.WRITE) == 6
    assert client.idle_time(Idle.BOTH) == 2


async def test_a_blocked_write_is_not_write_idle(autojump_clock: trio.testing.MockClock) -> None:
    client, server = memory_pair(lockstep=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send, b"slow reader")
        await trio.sleep(30)
        assert client.idle_time(Idle.WRITE) == 0
        assert client.idle_time(Idle.READ) == 30
        await server.receive()


# -- concurrency -------------------------------------------------------------------


async def test_concurrent_sends_are_serialized_in_fifo_order() -> None:
    client, server = memory_pair(lockstep=True)
    # Each message needs several reads, so interleaved writes would show.
    messages = [bytes([i]) * 200_000 for i in range(6)]
    async with trio.open_nursery() as nursery:
        for message in messages:
            nursery.start_soon(client.send, message)
            await wait_all_tasks_blocked()  # the sender is now queued
        received = [await server.receive() for _ in messages]
    assert received == messages
    assert client.stats.messages_sent == len(messages)


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
async def test_concurrent_sends_over_full_socket_buffers_stay_whole(
    stream_pair: MakeStreamPair, kind: str
) -> None:
    client, server = await connections(stream_pair, kind)
    for conn in (client, server):
        sock = socket_of(conn)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    # Each message is far larger than the buffers, so every send is cut into
    # many partial writes, any of which could interleave with another task's.
    messages = [bytes([i]) * 300_000 for i in range(8)]
    async with trio.open_nursery() as nursery:
        for message in messages:
            nursery.start_soon(client.send, message)
        received = [await server.receive() for _ in messages]
    assert sorted(received) == sorted(messages)
    assert client.stats.bytes_sent == sum(len(m) + 4 for m in messages)


async def test_async_with_closes_the_socket_even_on_error(stream_pair: MakeStreamPair) -> None:
    raw_client, _raw_server = await stream_pair("tcp")
    assert isinstance(raw_client, trio.SocketStream)
    sock = raw_client.socket
    assert sock.fileno() >= 0
    with pytest.raises(KeyError):
        async with Connection(raw_client, CODEC) as conn:
            assert conn.state is ConnState.CONNECTED
            raise KeyError("boom")
    assert conn.is_closed
    assert sock.fileno() == -1


async def test_a_cancelled_queued_send_does_not_block_the_others() -> None:
    client, server = memory_pair(lockstep=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send, b"first")
        await wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send(b"never")  # cancelled while queued: nothing written
        nursery.start_soon(client.send, b"third")
        await wait_all_tasks_blocked()
        assert await server.receive() == b"first"
        assert await server.receive() == b"third"
    assert client.state is ConnState.CONNECTED


async def test_concurrent_receive_is_busy_resource_error() -> None:
    client, server = memory_pair()
    async with trio.open_nursery() as nursery:
        got = []

        async def first() -> None:
            got.append(await client.receive())

        nursery.start_soon(first)
        await wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.receive()
        await server.send(b"for the first")
    assert got == [b"for the first"]
    assert client.state is ConnState.CONNECTED


async def test_backpressure_send_waits_for_the_reader() -> None:
    client, server = memory_pair(lockstep=True)
    done = trio.Event()

    async def sender() -> None:
        await client.send(b"m" * 1000)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await wait_all_tasks_blocked()
        assert not done.is_set()
        assert await server.receive() == b"m" * 1000
    assert done.is_set()


async def test_cancelled_receive_loses_no_bytes(autojump_clock: trio.testing.MockClock) -> None:
    client, server = memory_pair()
    frame = CODEC.encode(b"patience")
    await server.stream.send_all(frame[:6])
    with trio.move_on_after(1) as scope:
        await client.receive()
    assert scope.cancelled_caught
    assert client.state is ConnState.CONNECTED
    assert not client.between_messages
    await server.stream.send_all(frame[6:])
    assert await client.receive() == b"patience"


async def test_cancelled_receive_keeps_decoded_messages() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2"])
    assert await client.receive() == b"1"
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.receive()
    assert scope.cancelled_caught
    assert await client.receive() == b"2"


async def test_cancelled_send_breaks_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, _server = memory_pair(lockstep=True)
    with trio.move_on_after(1):
        await client.send(b"half of me may be on the wire")
    assert client.state is ConnState.ERROR
    assert client.is_closed
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"x")


# -- per-phase limits -------------------------------------------------------------


async def test_first_byte_limit_names_its_phase(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = memory_pair()
    client._limits = Limits(first_timeout=5)
    start = trio.current_time()
    with pytest.raises(CommTimeout) as info:
        await client.receive()
    assert trio.current_time() - start == 5
    error = info.value
    assert isinstance(error, TimeoutError)
    assert (error.phase, error.limit, error.peer) == ("first_response", 5, "memory stream")
    assert "first_response" in str(error)
    assert "memory stream" in str(error)
    assert client.state is ConnState.ERROR


@pytest.mark.parametrize("phase", ["first_request", "keepalive"])
async def test_first_byte_phase_is_chosen_by_the_caller(
    autojump_clock: trio.testing.MockClock, phase: str
) -> None:
    client, _server = memory_pair()
    client._limits = Limits(first_phase=phase, first_timeout=2)
    with pytest.raises(CommTimeout) as info:
        await client.receive()
    assert info.value.phase == phase


async def test_receive_limit_covers_the_rest_of_a_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = memory_pair()
    client._limits = Limits(first_timeout=100, receive=3)
    frame = CODEC.encode(b"slowly")

    async def dribble() -> None:
        with pytest.raises(trio.BrokenResourceError):  # the client gives up
            for byte in frame:
                await server.stream.send_all(bytes([byte]))
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        with pytest.raises(CommTimeout) as info:
            await client.receive()
    assert info.value.phase == "receive"
    assert info.value.limit == 3


async def test_inactivity_limit_catches_a_stalled_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = memory_pair()
    client._limits = Limits(receive=100, inactivity=2)
    await server.stream.send_all(CODEC.encode(b"stalled")[:5])
    start = trio.current_time()
    with pytest.raises(CommTimeout) as info:
        await client.receive()
    assert info.value.phase == "inactivity"
    assert trio.current_time() - start == 2


async def test_steady_progress_is_not_inactivity(autojump_clock: trio.testing.MockClock) -> None:
    client, server = memory_pair()
    client._limits = Limits(inactivity=2)
    frame = CODEC.encode(b"x" * 20)

    async def dribble() -> None:
        for byte in frame:
            await trio.sleep(1)
            await server.stream.send_all(bytes([byte]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        assert await client.receive() == b"x" * 20
    assert client.state is ConnState.CONNECTED


async def test_send_limit(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = memory_pair(lockstep=True)
    client._limits = Limits(send=3)
    with pytest.raises(CommTimeout) as info:
        await client.send(b"nobody reads this")
    assert (info.value.phase, info.value.limit) == ("send", 3)
    assert client.state is ConnState.ERROR


async def test_send_inactivity_limit(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = memory_pair(lockstep=True)
    client._limits = Limits(send=60, inactivity=4)
    with pytest.raises(CommTimeout) as info:
        await client.send(b"nobody reads this")
    assert (info.value.phase, info.value.limit) == ("inactivity", 4)


async def test_limits_can_be_lifted(autojump_clock: trio.testing.MockClock) -> None:
    client, server = memory_pair()
    client._limits = Limits(first_timeout=1)
    client._limits = Limits()
    async with trio.open_nursery() as nursery:

        async def late() -> None:
            await trio.sleep(50)
            await server.send(b"late")

        nursery.start_soon(late)
        assert await client.receive() == b"late"


# -- identity, state, addresses ---------------------------------------------------


async def test_identity_context_and_sessions() -> None:
    a, b = memory_pair()
    assert a.id != b.id
    assert isinstance(a.id, int)
    a.context["user"] = "alice"
    assert b.context == {}
    assert a.seq == 0
    a._begin_session()
    assert a.seq == 0  # the first session
    a._begin_session()
    a._begin_session()
    assert a.seq == 2
    assert a.codec is CODEC
    assert "memory stream" in repr(a)
    assert "CONNECTED" in repr(a)


async def test_state_hook_and_error_is_final() -> None:
    client, server = memory_pair()
    client._set_state(ConnState.RECEIVING)
    assert client.state is ConnState.RECEIVING
    client._set_state(ConnState.KEEPALIVE)
    assert client.state is ConnState.KEEPALIVE
    await client.abort()
    assert client.state is ConnState.ERROR
    client._set_state(ConnState.IDLE)
    assert client.state is ConnState.ERROR
    await client.aclose()
    assert client.state is ConnState.ERROR
    with pytest.raises(trio.EndOfChannel):
        await server.receive()


async def test_closed_state_is_final() -> None:
    client, _server = memory_pair()
    await client.aclose()
    client._set_state(ConnState.IDLE)
    assert client.state is ConnState.CLOSED


@pytest.mark.parametrize("kind", SOCKET_KINDS)
async def test_addresses_and_security(stream_pair: MakeStreamPair, kind: str) -> None:
    client, server = await connections(stream_pair, kind)
    sock = socket_of(client)
    assert client.local_address == sock.getsockname()
    assert client.remote_address == sock.getpeername()
    assert server.remote_address == socket_of(server).getpeername()
    assert client.is_secure is server.is_secure is (kind == "tls")
    if kind == "unix":
        assert client.peer == sock.getpeername()
    else:
        assert client.remote_address == server.local_address
        host, port = client.remote_address[:2]  # type: ignore[index]
        expected = f"[{host}]:{port}" if kind == "tcp6" else f"127.0.0.1:{port}"
        assert client.peer == expected
        assert server.peer.endswith(f":{client.local_address[1]}")  # type: ignore[index]
        assert client.peer in repr(client)


async def test_memory_stream_has_no_addresses() -> None:
    client, _ = memory_pair()
    assert client.local_address is None
    assert client.remote_address is None
    assert client.peer == "memory stream"
    assert not client.is_secure


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("127.0.0.1", 80), "127.0.0.1:80"),
        (("::1", 8080, 0, 0), "[::1]:8080"),
        ("/run/app.sock", "/run/app.sock"),
        (b"/run/app.sock", "/run/app.sock"),
        ("", "unix socket"),
        (None, "unknown peer"),
    ],
)
def test_format_address(address: object, text: str) -> None:
    assert format_address(address) == text


async def test_receive_limit_does_not_count_time_spent_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A pipelined peer sent the start of its second message together with the
    # first. The application then worked for a long time before receiving
    # again: that time is not the peer's fault, so the receive limit counts
    # from the call, not from when those first bytes arrived.
    client, server = memory_pair()
    second = CODEC.encode(b"second")
    await trio.sleep(1)  # the first bytes arrive at a non-zero time
    await server.stream.send_all(CODEC.encode(b"first") + second[:5])
    assert await client.receive() == b"first"
    await trio.sleep(100)
    client._limits = Limits(receive=5)

    async def rest_soon() -> None:
        await trio.sleep(1)
        await server.stream.send_all(second[5:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest_soon)
        assert await client.receive() == b"second"
    assert client.state is ConnState.CONNECTED


@pytest.mark.parametrize("kind", ["memory", "tcp"])
@pytest.mark.parametrize(
    "codec", [Lines(), Lines(b"\r\n"), LengthPrefixed("<H")], ids=["lf", "crlf", "le16"]
)
async def test_other_codecs_cross_a_connection(
    stream_pair: MakeStreamPair, kind: str, codec: Any
) -> None:
    client, server = await connections(stream_pair, kind, codec)
    lines = [b"PING", b"", b"SET k v", b"x" * 5000]
    await client.send_many(lines)
    await client.aclose()
    assert [m async for m in server] == lines
    assert server.stats.bytes_received == sum(len(codec.encode(m)) for m in lines)


async def test_close_in_the_middle_of_a_line_is_connection_lost() -> None:
    client, server = memory_pair(Lines(b"\r\n"))
    await server.stream.send_all(b"complete\r\nhalf a line\r")
    await server.aclose()
    assert await client.receive() == b"complete"
    with pytest.raises(ConnectionLost):
        await client.receive()


async def test_raw_counts_bytes_of_a_typed_memoryview() -> None:
    import array

    numbers = array.array("i", range(10))  # 10 items, 40 bytes
    left, right = connection_pair(Raw())
    await left.send(memoryview(numbers))
    await left.send(memoryview(numbers)[::2])  # not contiguous: copied
    assert left.stats.bytes_sent == 40 + 20
    received = b""
    while len(received) < 60:
        received += await right.receive()
    assert received == numbers.tobytes() + numbers[::2].tobytes()


async def test_sessions_counts_the_requests_handed_to_the_handler() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2", b"3", b"4"])
    assert await client.receive() == b"1"
    assert client.sessions == 0
    seen: list[tuple[bytes, int, int]] = []

    async def handler(request: bytes, conn: Connection[Any, Any]) -> None:
        seen.append((request, conn.seq, conn.sessions))
        if request == b"3":
            await conn.abort()  # the round hands over no more requests

    await client._answer(handler, b"1", Limits())
    assert seen == [(b"1", 0, 1), (b"2", 1, 2), (b"3", 2, 3)]
    assert client.sessions == 3  # b"4" was never handed to the handler


async def test_a_send_cancelled_in_a_round_leaves_the_earlier_replies_to_be_written() -> None:
    client, server = memory_pair()
    await server.send_many([b"1", b"2"])
    assert await client.receive() == b"1"

    async def handler(request: bytes, conn: Connection[Any, Any]) -> bytes:
        if request == b"2":
            with trio.CancelScope() as scope:
                scope.cancel()
                await conn.send(b"push")  # cancelled before it writes anything
            assert scope.cancelled_caught
        return b"r" + request

    await client._answer(handler, b"1", Limits())
    assert await server.receive() == b"r1"  # the cancelled send did not take it
    assert await server.receive() == b"r2"
