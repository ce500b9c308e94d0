"""A client's ``connection_closed(conn, error)`` for connections that its own
checks closed: ``error`` is what failed (``on_connect``, a health check), never
``None``."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio
import trio.testing

from triocomm import Connection, ConnectionLost, LengthPrefixed, Observer, Target, open_client

try:
    from .test_client_peers import Peer, echo, scripted_server
except ImportError:
    from test_client_peers import Peer, echo, scripted_server

CODEC = LengthPrefixed()
LOOPBACK = "127.0.0.1"


class Closes(Observer):
    """The error of every closed connection, by connection id, as the very object."""

    def __init__(self) -> None:
        self.opened: list[int] = []
        self.closed: dict[int, BaseException | None] = {}

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        self.opened.append(conn.id)

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        self.closed[conn.id] = error


async def test_a_connection_rejected_by_on_connect_closes_with_its_exception() -> None:
    failure = ValueError("no greeting")

    async def on_connect(conn: Connection[bytes, bytes]) -> None:
        raise failure

    closes = Closes()
    async with scripted_server(echo) as server:
        target = Target(LOOPBACK, server.port, CODEC, on_connect=on_connect)
        async with open_client(observers=[closes], retries=0) as client:
            with pytest.raises(ValueError, match="no greeting"):
                await client.request(target, b"a")
    assert len(closes.opened) == 1
    assert closes.closed == {closes.opened[0]: failure}


async def test_on_connect_that_leaves_unread_data_closes_with_connection_lost() -> None:
    async def greet_and_start_more(peer: Peer) -> None:
        # One small write (one loopback segment): the greeting and the start of
        # another frame reach the client's buffer in the same read.
        await peer.stream.send_all(struct.pack("!I", 5) + b"hello" + b"\x00\x00")
        await peer.wait_eof()

    async def on_connect(conn: Connection[bytes, bytes]) -> None:
        assert await conn.receive() == b"hello"

    closes = Closes()
    async with scripted_server(greet_and_start_more) as server:
        target = Target(LOOPBACK, server.port, CODEC, on_connect=on_connect)
        async with open_client(observers=[closes], retries=0) as client:
            with pytest.raises(ConnectionLost, match="unread data") as raised:
                await client.request(target, b"a")
    assert closes.closed == {closes.opened[0]: raised.value}


async def test_a_connection_that_fails_its_health_check_closes_with_its_exception(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failure = RuntimeError("unhealthy")
    checks = 0

    async def health_check(conn: Connection[bytes, bytes]) -> None:
        nonlocal checks
        checks += 1
        if checks == 1:
            raise failure

    closes = Closes()
    async with scripted_server(echo) as server:
        target = Target(
            LOOPBACK, server.port, CODEC, health_check=health_check, health_check_after=1.0
        )
        async with open_client(observers=[closes]) as client:
            assert await client.request(target, b"a") == b"a"
            await trio.sleep(2.0)  # idle past health_check_after: checked before reuse
            assert await client.request(target, b"b") == b"b"
            assert client.stats(target).health_checks_failed == 1
    first, second = closes.opened
    assert closes.closed == {first: failure, second: None}
