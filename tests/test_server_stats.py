"""The I/O sums and the peak of ``ServerStats``: closed connections and open ones."""

from __future__ import annotations

import struct
from functools import partial

import trio

import triocomm
from triocomm import Connection, LengthPrefixed, Server

LOOPBACK = "127.0.0.1"


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    return request * 2


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def exchange(stream: trio.abc.Stream, payload: bytes) -> None:
    await stream.send_all(frame(payload))
    want, got = 4 + 2 * len(payload), b""
    while len(got) < want:
        got += await stream.receive_some(want - len(got))


async def test_stats_sum_closed_and_open_connections_and_keep_the_peak() -> None:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(
            partial(triocomm.serve, echo, 0, host=LOOPBACK, codec=LengthPrefixed())
        )
        first = await trio.open_tcp_stream(LOOPBACK, server.port)
        second = await trio.open_tcp_stream(LOOPBACK, server.port)
        await exchange(first, b"abc")
        await exchange(first, b"de")
        await exchange(second, b"fghij")
        stats = server.stats
        assert (stats.messages_received, stats.messages_sent) == (3, 3)
        assert stats.bytes_received == 3 * 4 + 10
        assert stats.bytes_sent == 3 * 4 + 20
        assert stats.connections_peak == 2
        await first.aclose()
        with trio.fail_after(5):
            while server.stats.connections_open > 1:
                await trio.sleep(0.005)
        await exchange(second, b"k")
        stats = server.stats  # the closed connection's share is kept
        assert (stats.messages_received, stats.messages_sent) == (4, 4)
        assert stats.bytes_received == 4 * 4 + 11
        assert stats.bytes_sent == 4 * 4 + 22
        assert (stats.connections_open, stats.connections_peak) == (1, 2)
        await second.aclose()
        nursery.cancel_scope.cancel()
