"""examples/redis_server.py: its commands, then the real redis-cli and redis-benchmark."""

from __future__ import annotations

import csv
import functools
import io
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from redis_server import INT64_MAX, RedisStore, serve_redis
from resp import NULL, ErrorReply, Null, Resp, RespValue, command

import triocomm
from conftest import EXAMPLES, require_binary
from triocomm.testing import connection_pair

# -- the commands, called directly -----------------------------------------------


async def call(store: RedisStore, *args: bytes | str | int) -> RespValue | Null:
    conn, _other = connection_pair(Resp())
    return await store.handle(command(*args), conn)


@pytest.mark.parametrize(
    ("args", "reply"),
    [
        (("PING",), "PONG"),
        (("ping", "hi"), b"hi"),
        (("ECHO", b"\x00\r\n"), b"\x00\r\n"),
        (("GET", "nope"), NULL),  # encodes as a null bulk string
        (("SET", "k", "v"), "OK"),
        (("MSET", "a", "1", "b", "2"), "OK"),
        (("MGET", "nope"), [None]),
        (("DEL", "nope", "nope"), 0),
        (("INCR", "fresh"), 1),
        (("CONFIG", "GET", "save"), [b"save", b""]),
        (("CONFIG", "get", "appendonly"), [b"appendonly", b"no"]),
        (("CONFIG", "GET", "maxmemory"), []),
    ],
)
async def test_each_command_on_an_empty_store(args: tuple[str, ...], reply: RespValue) -> None:
    assert await call(RedisStore(), *args) == reply


async def test_commands_share_one_keyspace() -> None:
    store = RedisStore()
    assert await call(store, "MSET", "a", "1", "b", "2", "a", "3") == "OK"
    assert await call(store, "MGET", "a", "b", "c") == [b"3", b"2", None]
    assert await call(store, "INCR", "a") == 4
    assert await call(store, "GET", "a") == b"4"
    assert await call(store, "DEL", "a", "b", "c") == 2
    assert store.data == {}
    assert store.calls[b"MGET"] == 1
    assert store.commands_served == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("NOPE", "x"), "ERR unknown command 'NOPE'"),
        (("GET",), "ERR wrong number of arguments for 'get' command"),
        (("GET", "a", "b"), "ERR wrong number of arguments for 'get' command"),
        (("PING", "a", "b"), "ERR wrong number of arguments for 'ping' command"),
        (("MSET", "a", "1", "b"), "ERR wrong number of arguments for 'mset' command"),
        (("SET", "k", "v", "EX", "10"), "ERR syntax error"),
        (("CONFIG", "SET", "save", ""), "ERR only CONFIG GET <parameter> is supported"),
    ],
)
async def test_mistakes_get_error_replies(args: tuple[str, ...], message: str) -> None:
    assert await call(RedisStore(), *args) == ErrorReply(message)


@pytest.mark.parametrize(
    "value", [b"abc", b"1.5", b" 1", b"+1", b"", b"01", b"99999999999999999999"]
)
async def test_incr_refuses_what_is_not_a_64_bit_integer(value: bytes) -> None:
    store = RedisStore()
    store.data[b"k"] = value
    assert await call(store, "INCR", "k") == ErrorReply(
        "ERR value is not an integer or out of range"
    )
    assert store.data[b"k"] == value


async def test_incr_at_the_top_of_the_range_overflows_cleanly() -> None:
    store = RedisStore()
    store.data[b"k"] = b"%d" % (INT64_MAX - 1)
    assert await call(store, "INCR", "k") == INT64_MAX
    assert await call(store, "INCR", "k") == ErrorReply("ERR increment or decrement would overflow")
    assert await call(store, "INCR", "k") == ErrorReply("ERR increment or decrement would overflow")
    assert await call(store, "SET", "n", "-5") == "OK"
    assert await call(store, "INCR", "n") == -4


async def test_requests_that_are_not_commands_get_a_protocol_error() -> None:
    conn, _other = connection_pair(Resp())
    store = RedisStore()
    for request in ([], "PING", [b"GET", 1], 5):
        reply = await store.handle(request, conn)
        assert isinstance(reply, ErrorReply)
        assert reply.message.startswith("ERR Protocol error")


# -- over TCP --------------------------------------------------------------------


@pytest.fixture
async def redis_example() -> AsyncIterator[tuple[RedisStore, triocomm.Server]]:
    """examples/redis_server.py serving a fresh store on a free loopback port."""
    store = RedisStore()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_redis, store, 0)
        yield store, server
        nursery.cancel_scope.cancel()


async def redis_cli(port: int, *args: str) -> str:
    binary = require_binary("redis-cli")
    with trio.fail_after(20):
        result = await trio.run_process(
            [binary, "-h", "127.0.0.1", "-p", str(port), "--no-raw", *args],
            capture_stdout=True,
            capture_stderr=True,
        )
    return result.stdout.decode()


@pytest.mark.needs_binary("redis-cli")
async def test_redis_cli_drives_every_command(
    redis_example: tuple[RedisStore, triocomm.Server],
) -> None:
    store, server = redis_example
    port = server.port
    assert port is not None
    # --no-raw makes redis-cli print the reply type it decoded.
    assert await redis_cli(port, "PING") == "PONG\n"
    assert await redis_cli(port, "PING", "hello") == '"hello"\n'
    assert await redis_cli(port, "ECHO", "two words") == '"two words"\n'
    assert await redis_cli(port, "SET", "greeting", "hi there") == "OK\n"
    assert await redis_cli(port, "GET", "greeting") == '"hi there"\n'
    assert await redis_cli(port, "GET", "missing") == "(nil)\n"
    assert await redis_cli(port, "MSET", "a", "1", "b", "2") == "OK\n"
    assert await redis_cli(port, "INCR", "a") == "(integer) 2\n"
    assert await redis_cli(port, "MGET", "a", "b", "missing") == '1) "2"\n2) "2"\n3) (nil)\n'
    assert await redis_cli(port, "DEL", "a", "b", "missing") == "(integer) 2\n"
    assert await redis_cli(port, "INCR", "greeting") == (
        "(error) ERR value is not an integer or out of range\n"
    )
    assert await redis_cli(port, "FLUSHALL") == "(error) ERR unknown command 'FLUSHALL'\n"
    assert store.data == {b"greeting": b"hi there"}
    # Every redis-cli run was its own connection; none was left open.
    assert server.stats.connections_total >= 12
    with trio.fail_after(5):
        while server.stats.connections_open:
            await trio.sleep(0.01)


@pytest.mark.needs_binary("redis-benchmark")
async def test_redis_benchmark_pipelined_reports_no_errors(
    redis_example: tuple[RedisStore, triocomm.Server],
) -> None:
    binary = require_binary("redis-benchmark")
    store, server = redis_example
    requests = 4000
    argv = [binary, "-h", "127.0.0.1", "-p", str(server.port), "-n", str(requests), "--csv"]
    argv += ["-t", "ping,set,get,incr", "-P", "16", "-c", "50"]
    with trio.fail_after(50):
        result = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = result.stdout.decode() + result.stderr.decode()
    # redis-benchmark stops with a non-zero status at the first error reply.
    assert result.returncode == 0, output
    assert "error" not in output.lower()
    rows = {
        row["test"]: float(row["rps"])
        for row in csv.DictReader(io.StringIO(result.stdout.decode()))
    }
    assert set(rows) == {"PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"}
    assert all(rps > 0 for rps in rows.values())
    # Each INCR ran exactly once: the counter equals the INCR commands served,
    # and with -P 16 a run sends at least the requested count.
    incrs = store.calls[b"INCR"]
    assert incrs >= requests
    assert store.data[b"counter:__rand_int__"] == b"%d" % incrs
    assert store.calls[b"SET"] >= requests
    assert store.calls[b"GET"] >= requests
    assert store.calls[b"PING"] >= 2 * requests  # inline and multi-bulk
    assert not server.stats.errors


async def test_bad_input_closes_only_that_connection(
    redis_example: tuple[RedisStore, triocomm.Server],
) -> None:
    _store, server = redis_example
    with trio.fail_after(10):
        good = triocomm.Connection(await trio.open_tcp_stream("127.0.0.1", server.port), Resp())
        bad = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with good, bad:
            await good.send(command("SET", "k", "v"))
            assert await good.receive() == "OK"
            await bad.send_all(b"*1\r\n$-7\r\n")  # a negative bulk length
            assert await bad.receive_some(100) == b""  # closed without a reply
            await good.send(command("GET", "k"))
            assert await good.receive() == b"v"
        while not server.stats.errors:  # counted just after the close
            await trio.sleep(0.01)
    assert server.stats.errors == {"protocol": 1}


async def test_a_command_split_into_single_bytes_is_answered(
    redis_example: tuple[RedisStore, triocomm.Server],
) -> None:
    _store, server = redis_example
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            for byte in b"*2\r\n$4\r\nECHO\r\n$3\r\nabc\r\nPING\r\n":
                await stream.send_all(bytes([byte]))
            received = b""
            while received != b"$3\r\nabc\r\n+PONG\r\n":
                chunk = await stream.receive_some(100)
                assert chunk, received
                received += chunk


def test_the_example_runs_as_a_script() -> None:
    # It must start with nothing but its own folder on sys.path, as a user
    # would run it; --help exits before serving.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "redis_server.py"), "--help"],
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert b"--port" in result.stdout


async def test_a_command_trickled_too_slowly_is_cut_off() -> None:
    # A real socket, so real (short) time: receive=0.5 s from first byte to last.
    timeouts = triocomm.ServerTimeouts(receive=0.5)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(serve_redis, RedisStore(), 0, timeouts=timeouts)
            )
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"*1\r\n$4\r\nPI")
                assert await stream.receive_some(100) == b""  # closed, nothing answered
                assert trio.current_time() - started >= 0.5
            # The service logs and counts it just after closing the socket.
            while not server.stats.errors:
                await trio.sleep(0.01)
            assert server.stats.errors == {"timeout": 1}
            nursery.cancel_scope.cancel()
