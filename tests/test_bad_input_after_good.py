"""Messages that arrive whole before bad bytes in the same read are not lost.

A decoder that meets bad input attaches what the same ``feed`` completed
before it (``ProtocolError.messages``); a Connection returns those first and
raises on the receive after them; a server answers them before it closes; a
client never pools such a connection.
"""

from __future__ import annotations

import functools
import struct

import pytest
import trio
import trio.testing

import triocomm
from triocomm import ConnState, FrameTooLarge, LengthPrefixed, Lines
from triocomm.testing import connection_pair

SMALL = LengthPrefixed(max_frame=100)


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


BAD_HEADER = struct.pack("!I", 1_000_000)


@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_length_prefixed_attaches_the_frames_before_a_bad_header(as_type: type) -> None:
    decoder = SMALL.decoder()
    data = frame(b"one") + frame(b"two") + BAD_HEADER
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(as_type(data))
    assert list(info.value.messages) == [b"one", b"two"]


def test_length_prefixed_attaches_frames_completed_from_the_buffer() -> None:
    decoder = SMALL.decoder()
    data = frame(b"one") + frame(b"two") + BAD_HEADER
    assert decoder.feed(data[:2]) == []  # half a header: buffered path from now on
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(data[2:])
    assert list(info.value.messages) == [b"one", b"two"]


def test_a_bad_header_alone_attaches_nothing() -> None:
    with pytest.raises(FrameTooLarge) as info:
        SMALL.decoder().feed(BAD_HEADER)
    assert list(info.value.messages) == []


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n"])
def test_lines_attaches_the_lines_before_an_over_long_one(delimiter: bytes) -> None:
    codec = Lines(delimiter, max_line=10)
    complete_long = b"a" + delimiter + b"b" + delimiter + b"x" * 11 + delimiter
    with pytest.raises(FrameTooLarge) as info:
        codec.decoder().feed(complete_long)
    assert list(info.value.messages) == [b"a", b"b"]
    unfinished_long = b"a" + delimiter + b"x" * 11
    with pytest.raises(FrameTooLarge) as info:
        codec.decoder().feed(unfinished_long)
    assert list(info.value.messages) == [b"a"]


async def test_connection_returns_the_good_messages_then_raises() -> None:
    left, right = connection_pair(SMALL)
    await left.stream.send_all(frame(b"one") + frame(b"two") + BAD_HEADER)
    assert await right.receive() == b"one"
    # Already ERROR (never to be reused), but still open so replies can go out.
    assert right.state is ConnState.ERROR
    assert not right.is_closed
    assert not right.between_messages
    await right.send(b"reply to one")
    assert await right.receive() == b"two"
    with pytest.raises(FrameTooLarge):
        await right.receive()
    assert right.state is ConnState.ERROR
    assert right.is_closed
    assert right.stats.messages_received == 2
    assert await left.receive() == b"reply to one"
    with pytest.raises(trio.ClosedResourceError):
        await right.receive()


async def test_closing_before_the_deferred_error_is_clean() -> None:
    left, right = connection_pair(SMALL)
    await left.stream.send_all(frame(b"one") + BAD_HEADER)
    assert await right.receive() == b"one"
    await right.aclose()
    assert right.state is ConnState.ERROR  # ERROR is final, even after a close
    with pytest.raises(trio.ClosedResourceError):
        await right.receive()


async def _serve(nursery: trio.Nursery, codec: LengthPrefixed) -> triocomm.Server:
    async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
        return b"re:" + request

    server: triocomm.Server = await nursery.start(
        functools.partial(triocomm.serve, echo, 0, host="127.0.0.1", codec=codec)
    )
    return server


async def test_a_server_answers_pipelined_requests_sent_before_garbage(
    nursery: trio.Nursery,
) -> None:
    server = await _serve(nursery, SMALL)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(frame(b"one") + frame(b"two") + BAD_HEADER)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(4096):
                received += chunk
    # Both replies, in order, then the server closed the connection.
    assert received == frame(b"re:one") + frame(b"re:two")
    with trio.fail_after(10):
        while server.stats.errors["frame_too_large"] != 1:
            await trio.sleep(0.01)
    # The service goes on serving others.
    other = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with triocomm.Connection(other, SMALL) as conn:
        await conn.send(b"three")
        assert await conn.receive() == b"re:three"


async def test_a_client_never_pools_a_connection_with_garbage_after_the_reply(
    nursery: trio.Nursery,
) -> None:
    async def replies_then_garbage(stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + struct.unpack("!I", buf[:4])[0]:
                    size = struct.unpack("!I", buf[:4])[0]
                    payload, buf = buf[4 : 4 + size], buf[4 + size :]
                    await stream.send_all(frame(payload) + BAD_HEADER)

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, replies_then_garbage, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    target = triocomm.Target("127.0.0.1", port, SMALL)
    async with triocomm.open_client() as client:
        assert await client.request(target, b"a") == b"a"
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        # Each reply came with garbage: never reused, each request opened anew.
        assert (stats.created, stats.reused, stats.idle) == (2, 0, 0)
