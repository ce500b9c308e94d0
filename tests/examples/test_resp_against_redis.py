"""examples/resp.py against a real redis-server, over a bare triocomm.Connection.

These prove the codec alone, before any client machinery: every RESP2 reply
type that Redis produces decodes to the value we expect.
"""

from __future__ import annotations

import pytest
import trio
from resp import ErrorReply, Resp, RespValue, command

import triocomm
from conftest import RedisServer

pytestmark = pytest.mark.needs_binary("redis-server")


async def open_redis_connection(server: RedisServer) -> triocomm.Connection[RespValue, RespValue]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    return triocomm.Connection(stream, Resp())


async def call(conn: triocomm.Connection[RespValue, RespValue], *args: bytes | str | int) -> object:
    with trio.fail_after(10):
        await conn.send(command(*args))
        return await conn.receive()


async def test_every_reply_type_from_redis(redis_server: RedisServer) -> None:
    conn = await open_redis_connection(redis_server)
    async with conn:
        # Before AUTH: an error reply, as a value.
        reply = await call(conn, "GET", "k")
        assert isinstance(reply, ErrorReply)
        assert reply.code == "NOAUTH"
        assert await call(conn, "AUTH", redis_server.password) == "OK"
        assert await call(conn, "PING") == "PONG"
        assert await call(conn, "SET", "k", b"\x00\r\n\xff") == "OK"
        assert await call(conn, "GET", "k") == b"\x00\r\n\xff"
        assert await call(conn, "GET", "missing") is None
        assert await call(conn, "INCRBY", "n", -7) == -7
        assert await call(conn, "MGET", "k", "missing", "n") == [b"\x00\r\n\xff", None, b"-7"]
        assert await call(conn, "RPUSH", "list", "a", "b") == 2
        assert await call(conn, "LRANGE", "list", 0, -1) == [b"a", b"b"]
        wrong = await call(conn, "INCR", "list")
        assert isinstance(wrong, ErrorReply)
        assert wrong.code == "WRONGTYPE"
        # A nested array: SCAN returns [cursor, [keys...]].
        cursor, keys = await call(conn, "SCAN", 0, "COUNT", 100)  # type: ignore[misc]
        assert cursor == b"0"
        assert sorted(keys) == [b"k", b"list", b"n"]
        # A null array: BLPOP that times out.
        assert await call(conn, "BLPOP", "empty", "0.01") is None


async def test_large_value_and_pipelining_against_redis(redis_server: RedisServer) -> None:
    conn = await open_redis_connection(redis_server)
    async with conn:
        await call(conn, "AUTH", redis_server.password)
        big = bytes(range(256)) * 8192  # 2 MiB, arrives in many reads
        commands: list[RespValue] = [command("SET", "big", big), command("STRLEN", "big")]
        commands += [command("INCR", "c") for _ in range(500)]
        commands.append(command("GET", "big"))
        with trio.fail_after(20):
            await conn.send_many(commands)
            replies = [await conn.receive() for _ in commands]
        assert replies[:2] == ["OK", len(big)]
        assert replies[2:-1] == list(range(1, 501))
        assert replies[-1] == big


async def test_codec_bounds_hold_against_a_real_server(redis_server: RedisServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", redis_server.port)
    async with triocomm.Connection(stream, Resp(max_message=1000)) as conn:
        await call(conn, "AUTH", redis_server.password)
        # Our own bound refuses to send 5000 bytes, so let Redis make them.
        assert await call(conn, "SETRANGE", "big", 4999, "x") == 5000
        with pytest.raises(triocomm.FrameTooLarge, match="max_message is 1000"):
            await call(conn, "GET", "big")
        assert conn.state is triocomm.ConnState.ERROR
