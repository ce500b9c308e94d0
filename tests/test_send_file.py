"""Connection.send_file: zero-copy on plain sockets, bounded chunks elsewhere.

The receiving end reads raw bytes, so every test checks the exact byte stream:
a header message, the file's bytes, a trailer message. A spy on
``os.sendfile`` tells which path ran and whether the sender had to wait for the
socket to become writable again (a file larger than the socket buffers).
"""

from __future__ import annotations

import io
import os
import random
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from triocomm import CommError, CommTimeout, Connection, ConnectionLost, ConnState, LengthPrefixed
from triocomm._timeouts import Limits

MakeStreamPair = Callable[[str], Awaitable[tuple[trio.abc.Stream, trio.abc.Stream]]]
CODEC = LengthPrefixed()
ZERO_COPY_KINDS = ("tcp", "unix")
ALL_KINDS = ("tcp", "tcp6", "unix", "tls", "memory", "lockstep")
MiB = 1024 * 1024


def pattern(size: int) -> bytes:
    # Random bytes, so a misplaced or repeated chunk would show.
    return random.Random(size).randbytes(size)


@pytest.fixture
def sendfile_spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count os.sendfile calls, the ones that found the socket full, and partial sends."""
    counts = {"calls": 0, "blocked": 0, "partial": 0}
    real = os.sendfile

    def spy(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        counts["calls"] += 1
        try:
            sent = real(out_fd, in_fd, offset, count)
        except BlockingIOError:
            counts["blocked"] += 1
            raise
        if sent < count:
            counts["partial"] += 1
        return sent

    monkeypatch.setattr(os, "sendfile", spy)
    return counts


def make_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = pattern(size)
    path = tmp_path / f"file-{size}.bin"
    path.write_bytes(data)
    return path, data


async def read_exactly(stream: trio.abc.Stream, size: int, step: int = 65536) -> bytes:
    """Read ``size`` bytes, or fewer if the stream ends first."""
    buf = bytearray()
    while len(buf) < size:
        data = await stream.receive_some(min(step, size - len(buf)))
        if not data:
            break
        buf += data
    return bytes(buf)


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    return stream.socket


def shrink_buffers(*streams: trio.abc.Stream) -> None:
    """Make the kernel buffers small so a few MiB cannot fit in them at once."""
    for stream in streams:
        sock = socket_of(stream)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_file_between_messages(
    stream_pair: MakeStreamPair, kind: str, tmp_path: Path, sendfile_spy: dict[str, int]
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    conn = Connection(raw_client, CODEC)
    path, data = make_file(tmp_path, 3 * MiB + 17)
    expected = CODEC.encode(b"header") + data + CODEC.encode(b"trailer")
    received = b""

    async def reader() -> None:
        nonlocal received
        received = await read_exactly(raw_server, len(expected))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await conn.send(b"header")
        assert await conn.send_file(path) == len(data)
        await conn.send(b"trailer")
    assert received == expected
    assert conn.stats.bytes_sent == len(expected)
    assert conn.stats.messages_sent == 2  # the file is not a message
    assert conn.state is ConnState.CONNECTED
    if kind in ZERO_COPY_KINDS:
        assert sendfile_spy["calls"] >= 1
    elif kind != "tcp6":
        assert sendfile_spy["calls"] == 0


@pytest.mark.parametrize("kind", ZERO_COPY_KINDS)
async def test_file_larger_than_socket_buffers_waits_for_writability(
    stream_pair: MakeStreamPair, kind: str, tmp_path: Path, sendfile_spy: dict[str, int]
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    shrink_buffers(raw_client, raw_server)
    conn = Connection(raw_client, CODEC)
    path, data = make_file(tmp_path, 6 * MiB)
    received = b""

    async def slow_reader() -> None:
        nonlocal received
        # Let the sender fill the buffers before reading anything.
        await wait_all_tasks_blocked()
        received = await read_exactly(raw_server, len(data), step=16 * 1024)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_reader)
        assert await conn.send_file(path) == len(data)
    assert received == data
    # The socket filled up: sendfile sent part of the file, found the socket
    # full, and the sender waited for writability instead of spinning or failing.
    assert sendfile_spy["partial"] >= 1
    assert sendfile_spy["blocked"] >= 1
    assert sendfile_spy["calls"] < len(data) // 1024  # waited, did not spin


@pytest.mark.parametrize("kind", ["tcp", "memory"])
@pytest.mark.parametrize(
    ("offset", "count"),
    [(0, None), (1000, None), (1000, 5000), (0, 0), (70_000, None), (300_000, 1)],
)
async def test_offset_and_count(
    stream_pair: MakeStreamPair,
    kind: str,
    tmp_path: Path,
    offset: int,
    count: int | None,
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    conn = Connection(raw_client, CODEC)
    path, data = make_file(tmp_path, 300_001)
    part = data[offset:] if count is None else data[offset : offset + count]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.send_file, str(path), offset, count)
        assert await read_exactly(raw_server, len(part)) == part
    assert conn.stats.bytes_sent == len(part)
    await conn.send(b"next")
    assert await read_exactly(raw_server, 8) == CODEC.encode(b"next")


@pytest.mark.parametrize("kind", ["tcp", "lockstep"])
async def test_open_file_object_and_position_is_irrelevant(
    stream_pair: MakeStreamPair, kind: str, tmp_path: Path
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    conn = Connection(raw_client, CODEC)
    path, data = make_file(tmp_path, 100_000)
    with open(path, "rb") as f:
        f.seek(500)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send_file, f, 10)
            assert await read_exactly(raw_server, len(data) - 10) == data[10:]


@pytest.mark.parametrize("kind", ["tcp", "tls", "memory"])
async def test_file_object_without_a_descriptor_falls_back_to_chunks(
    stream_pair: MakeStreamPair, kind: str, sendfile_spy: dict[str, int]
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    conn = Connection(raw_client, CODEC)
    data = pattern(600_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.send_file, io.BytesIO(data), 3, 599_990)
        assert await read_exactly(raw_server, 599_990) == data[3:599_993]
    assert sendfile_spy["calls"] == 0


async def test_arguments_outside_the_file_are_value_errors(tmp_path: Path) -> None:
    left, _right = trio.testing.memory_stream_pair()
    conn = Connection(left, CODEC)
    path, _ = make_file(tmp_path, 100)
    for offset, count in [(101, None), (50, 51), (-1, None), (0, -5)]:
        with pytest.raises(ValueError, match=r"offset|count"):
            await conn.send_file(path, offset, count)
    assert conn.state is ConnState.CONNECTED
    assert conn.stats.bytes_sent == 0
    assert await conn.send_file(path, 100) == 0


class LyingFile(io.BytesIO):
    """Claims to be bigger than it is (a file truncated under our feet)."""

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == os.SEEK_END:
            return len(self.getbuffer()) + 1000
        return super().seek(offset, whence)


async def test_file_ending_early_breaks_the_connection() -> None:
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(left, CODEC)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_exactly, right, 10_000)
        with pytest.raises(CommError, match="1000 bytes early"):
            await conn.send_file(LyingFile(b"x" * 5000))
        nursery.cancel_scope.cancel()
    # The peer was promised more bytes than it got: the stream is out of sync.
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("kind", ["tcp", "unix", "tls", "lockstep"])
async def test_peer_closing_halfway_is_connection_lost(
    stream_pair: MakeStreamPair, kind: str, tmp_path: Path
) -> None:
    raw_client, raw_server = await stream_pair(kind)
    if kind != "lockstep":
        shrink_buffers(raw_client, raw_server)
    conn = Connection(raw_client, CODEC)
    path, _ = make_file(tmp_path, 16 * MiB)

    async def quitter() -> None:
        await read_exactly(raw_server, MiB)
        await trio.aclose_forcefully(raw_server)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quitter)
        with pytest.raises(ConnectionLost, match="file"):
            await conn.send_file(path)
    assert conn.state is ConnState.ERROR
    assert conn.is_closed
    assert MiB <= conn.stats.bytes_sent < 16 * MiB
    if kind != "lockstep":
        assert socket_of(raw_client).fileno() == -1


async def test_chunked_fallback_keeps_memory_bounded(tmp_path: Path) -> None:
    left, right = trio.testing.lockstep_stream_pair()
    conn = Connection(left, CODEC)
    path, _ = make_file(tmp_path, 16 * MiB)
    seen = 0

    async def drain() -> None:
        nonlocal seen
        while seen < 16 * MiB:
            seen += len(await right.receive_some(65536))

    tracemalloc.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            assert await conn.send_file(path) == 16 * MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == 16 * MiB
    # A few chunks in flight at most, never the whole 16 MiB file.
    assert peak < 3 * MiB


async def test_sends_queue_behind_a_file(tmp_path: Path) -> None:
    left, right = trio.testing.lockstep_stream_pair()
    conn = Connection(left, CODEC)
    path, data = make_file(tmp_path, MiB)
    expected = data + CODEC.encode(b"after")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.send_file, path)
        await wait_all_tasks_blocked()
        nursery.start_soon(conn.send, b"after")
        await wait_all_tasks_blocked()
        assert await read_exactly(right, len(expected)) == expected


async def test_cancelled_file_send_breaks_the_connection(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    left, _right = trio.testing.lockstep_stream_pair()
    conn = Connection(left, CODEC)
    path, _ = make_file(tmp_path, 1000)
    with trio.move_on_after(5):
        await conn.send_file(path)
    assert conn.state is ConnState.ERROR


async def test_send_limit_applies_to_zero_copy(stream_pair: MakeStreamPair, tmp_path: Path) -> None:
    raw_client, raw_server = await stream_pair("tcp")
    shrink_buffers(raw_client, raw_server)
    conn = Connection(raw_client, CODEC)
    conn._limits = Limits(send=0.2)
    path, _ = make_file(tmp_path, 8 * MiB)
    with pytest.raises(CommTimeout) as info:
        await conn.send_file(path)  # nobody reads
    assert info.value.phase == "send"
    assert conn.state is ConnState.ERROR
    assert socket_of(raw_client).fileno() == -1


async def test_send_file_updates_write_idleness(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    left, right = trio.testing.memory_stream_pair()
    conn = Connection(left, CODEC)
    path, data = make_file(tmp_path, 10)
    await trio.sleep(7)
    await conn.send_file(path)
    assert conn.stats.last_send_at == trio.current_time()
    assert conn.idle_time() == 0
    assert await read_exactly(right, 10) == data


async def test_path_arguments_are_accepted_in_every_form(tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 1234)
    for form in (path, str(path)):
        left, right = trio.testing.memory_stream_pair()
        conn = Connection(left, CODEC)
        assert await conn.send_file(form) == 1234
        assert await read_exactly(right, 1234) == data
