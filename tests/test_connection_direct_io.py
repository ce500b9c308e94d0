"""The direct socket path of Connection (os.read / os.write on a plain socket).

A Connection over a plain ``trio.SocketStream`` bypasses the stream's layers
for speed. These tests pin down that it keeps the stream's contract: every
send and receive is a checkpoint, a large write that must wait for the peer
arrives whole, limits still fire with their phase while waiting, a
cancelled receive loses no bytes, and socket errors map to the same
exceptions as through ``SocketStream``.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest
import trio
import trio.testing

from passive import answered
from triocomm import CommTimeout, Connection, ConnectionLost, LengthPrefixed
from triocomm._timeouts import Limits

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX direct I/O only")

CODEC = LengthPrefixed()


async def tcp_pair() -> tuple[Connection[bytes, bytes], Connection[bytes, bytes]]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        accepted: list[trio.SocketStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await trio.open_tcp_stream("127.0.0.1", port)
    await listener.aclose()
    return Connection(client, CODEC), Connection(accepted[0], CODEC)


def shrink_buffers(conn: Connection[bytes, bytes]) -> None:
    sock = conn.stream.socket  # type: ignore[attr-defined]
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


async def test_plain_sockets_take_the_direct_path() -> None:
    left, right = await tcp_pair()
    async with left, right:
        assert left._sock is not None
        assert right._sock is not None
    memory_left, _ = trio.testing.memory_stream_pair()
    assert Connection(memory_left, CODEC)._sock is None


async def test_send_and_receive_are_checkpoints() -> None:
    left, right = await tcp_pair()
    async with left, right:
        with trio.testing.assert_checkpoints():
            await left.send(b"one")
        await trio.sleep(0.05)  # the bytes are in right's socket buffer now
        with trio.testing.assert_checkpoints():
            assert await right.receive() == b"one"
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await left.send(b"never")
        # Cancelled before any byte was written: the stream is intact, and
        # the connection stays open (a send cancelled part-way breaks it).
        assert not left.is_closed
        await left.send(b"two")
        assert await right.receive() == b"two"  # "never" was not written


async def test_large_message_that_must_wait_for_the_peer_arrives_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = 0
    wait_writable = trio.lowlevel.wait_writable

    async def counting_wait_writable(sock: trio.socket.SocketType) -> None:
        nonlocal waits
        waits += 1
        await wait_writable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_writable", counting_wait_writable)
    left, right = await tcp_pair()
    shrink_buffers(left)
    payload = bytes(range(256)) * 4096  # 1 MiB: more than the buffers hold
    async with left, right, trio.open_nursery() as nursery:
        nursery.start_soon(left.send, payload)
        assert await right.receive() == payload
    assert waits > 0  # the write really was partial and waited
    assert left.stats.bytes_sent == len(payload) + 4


async def test_blocked_write_times_out_with_its_phase() -> None:
    left, right = await tcp_pair()
    shrink_buffers(left)
    shrink_buffers(right)
    async with left, right:
        left._limits = Limits(send=0.2)
        with pytest.raises(CommTimeout) as info:
            await left.send(b"x" * (8 * 1024 * 1024))  # the peer never reads
        assert info.value.phase == "send"
        assert left.is_closed


async def test_stalled_write_times_out_as_inactivity() -> None:
    left, right = await tcp_pair()
    shrink_buffers(left)
    shrink_buffers(right)
    async with left, right:
        left._limits = Limits(inactivity=0.2)
        with pytest.raises(CommTimeout) as info:
            await left.send(b"x" * (8 * 1024 * 1024))
        assert info.value.phase == "inactivity"


async def test_waiting_read_times_out_with_its_phase() -> None:
    left, right = await tcp_pair()
    async with left, right:
        right._limits = Limits(first_phase="first_request", first_timeout=0.1)
        with pytest.raises(CommTimeout) as info:
            await right.receive()
        assert info.value.phase == "first_request"


async def test_cancelled_receive_loses_no_bytes() -> None:
    left, right = await tcp_pair()
    async with left, right:
        with trio.move_on_after(0.05):
            await right.receive()
        await left.send(b"after")
        assert await right.receive() == b"after"


async def test_reset_by_peer_is_connection_lost() -> None:
    left, right = await tcp_pair()
    async with right:
        sock = left.stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await left.aclose()  # linger 0: the peer sees a reset
        await trio.sleep(0.05)
        with pytest.raises(ConnectionLost):
            await right.receive()


async def test_stream_closed_underneath_is_closed_resource() -> None:
    left, right = await tcp_pair()
    async with left:
        await right.stream.aclose()  # bypassing the connection
        with pytest.raises(trio.ClosedResourceError):
            await right.receive()


async def test_receive_blocked_when_stream_closes_is_closed_resource() -> None:
    left, right = await tcp_pair()
    async with left, trio.open_nursery() as nursery:

        async def close_soon() -> None:
            await trio.testing.wait_all_tasks_blocked()
            await right.stream.aclose()

        nursery.start_soon(close_soon)
        with pytest.raises(trio.ClosedResourceError):
            await right.receive()


async def test_pipelined_bursts_leave_the_shared_empty_queue_untouched() -> None:
    from triocomm._connection import _NO_PENDING

    left, right = await tcp_pair()
    async with left, right:
        await left.send_many([b"a", b"b", b"c"])
        assert await right.receive() == b"a"
        assert right.pending == 2
        assert await answered(right, b"a") == [b"a", b"b", b"c"]
        await left.send_many([b"d", b"e"])
        assert await right.receive() == b"d"
        assert await right.receive() == b"e"
        assert right.pending == 0
        assert len(_NO_PENDING) == 0
        right.context["k"] = 1
        assert right.context == {"k": 1}
