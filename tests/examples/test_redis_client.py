"""examples/redis_client.py against a real, password-protected redis-server."""

from __future__ import annotations

import pytest
import trio
from redis_client import Handshake, Redis, RedisError
from resp import Resp, command

import triocomm
from conftest import RedisServer, open_fds

pytestmark = pytest.mark.needs_binary("redis-server")


async def test_every_command_returns_what_redis_says(redis_server: RedisServer) -> None:
    async with triocomm.open_client() as client:
        redis = Redis(client, port=redis_server.port, password=redis_server.password)
        assert await redis.ping() == "PONG"
        await redis.set("text", "hello")
        await redis.set(b"bin\x00", b"\x00\r\n\xff")
        await redis.set("n", 41)
        assert await redis.get("text") == b"hello"
        assert await redis.get(b"bin\x00") == b"\x00\r\n\xff"
        assert await redis.get("missing") is None
        assert await redis.incr("n") == 42
        assert await redis.incr("fresh") == 1
        assert await redis.mget("text", "missing", "n") == [b"hello", None, b"42"]
        assert await redis.delete("text", "missing", "fresh") == 2
        assert await redis.execute("STRLEN", "n") == 2
        # An error reply raises, and does not cost the connection.
        with pytest.raises(RedisError) as info:
            await redis.incr(b"bin\x00")
        assert info.value.code == "ERR"
        assert info.value.command == "INCR"
        assert "not an integer" in str(info.value)
        await redis.execute("RPUSH", "list", "x")
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await redis.get("list")
        stats = client.stats(redis.target)
        # One caller at a time: one connection did everything.
        assert (stats.created, stats.closed, stats.failed) == (1, 0, 0)
        assert stats.reused == 14


async def test_pipeline_sends_many_commands_on_one_connection(redis_server: RedisServer) -> None:
    async with triocomm.open_client() as client:
        redis = Redis(client, port=redis_server.port, password=redis_server.password)
        await redis.set("word", "abc")
        commands: list[tuple[str | int, ...]] = [("INCR", "p")] * 300
        commands += [("INCR", "word"), ("GET", "word"), ("MGET", "p", "nope"), ("PING",)]
        replies = await redis.pipeline(commands)
        assert replies[:300] == list(range(1, 301))
        error = replies[300]
        assert isinstance(error, RedisError)
        assert error.command == "INCR"
        assert replies[301:] == [b"abc", [b"300", None], "PONG"]
        assert await redis.pipeline([]) == []
        stats = client.stats(redis.target)
        assert (stats.created, stats.reused, stats.failed) == (1, 1, 0)


async def test_pipeline_runs_on_one_pooled_connection(redis_server: RedisServer) -> None:
    # The pipeline borrows the pooled connection, sends its 50 commands and
    # reads its 50 replies there, and gives the connection back in step.
    async with triocomm.open_client() as client:
        redis = Redis(client, port=redis_server.port, password=redis_server.password)
        await redis.ping()
        async with client.connection(redis.target) as conn:
            before = conn.stats.messages_sent
            conn_id = conn.id
        await redis.pipeline([("PING",)] * 50)
        async with client.connection(redis.target) as conn:
            assert conn.id == conn_id
            assert conn.stats.messages_sent - before == 50
            assert conn.stats.messages_received == 1 + 1 + 50  # AUTH, PING, the pipeline


async def test_on_connect_logs_in_and_selects_the_database(redis_server: RedisServer) -> None:
    async with triocomm.open_client() as client:
        db3 = Redis(client, port=redis_server.port, password=redis_server.password, db=3)
        db0 = Redis(client, port=redis_server.port, password=redis_server.password)
        await db3.set("where", "three")
        assert await db0.get("where") is None
        assert await db3.get("where") == b"three"
        assert await db3.execute("CLIENT", "INFO") is not None
        info = await db3.execute("CLIENT", "INFO")
        assert isinstance(info, bytes)
        assert b" db=3 " in info
        # The handshake ran once per connection, as the session with seq 0.
        async with client.connection(db3.target) as conn:
            assert conn.seq == 5  # handshake, SET, GET, CLIENT INFO x2, this one
        assert client.stats(db3.target).created == 1


async def test_equal_settings_share_one_pool(redis_server: RedisServer) -> None:
    async with triocomm.open_client() as client:
        a = Redis(client, port=redis_server.port, password=redis_server.password)
        b = Redis(client, port=redis_server.port, password=redis_server.password)
        assert a.target == b.target
        await a.ping()
        await b.ping()
        assert client.stats(a.target).created == 1
    assert "secret" not in repr(Handshake("secret"))
    assert redis_server.password not in repr(a.target)


async def test_wrong_or_missing_password_is_a_clear_error(redis_server: RedisServer) -> None:
    async with triocomm.open_client() as client:
        wrong = Redis(client, port=redis_server.port, password="not-it")
        with pytest.raises(RedisError) as info:
            await wrong.ping()
        assert info.value.code == "WRONGPASS"
        assert info.value.command == "AUTH"
        # The refused connection was closed, never pooled.
        stats = client.stats(wrong.target)
        assert (stats.open, stats.created) == (0, 0)
        anonymous = Redis(client, port=redis_server.port)
        with pytest.raises(RedisError) as info:
            await anonymous.get("k")
        assert info.value.code == "NOAUTH"


async def test_200_concurrent_callers_share_8_connections(redis_server: RedisServer) -> None:
    callers, rounds = 200, 5
    fds_before = open_fds()
    async with triocomm.open_client() as client:
        redis = Redis(
            client, port=redis_server.port, password=redis_server.password, max_connections=8
        )
        most_open = 0
        done = trio.Event()

        async def watch() -> None:
            nonlocal most_open
            while not done.is_set():
                stats = client.stats(redis.target)
                most_open = max(most_open, stats.open + stats.connecting)
                await trio.sleep(0)

        async def caller(i: int) -> None:
            for r in range(rounds):
                await redis.incr("shared")
                await redis.set(f"key:{i}", f"{i}:{r}")
                assert await redis.get(f"key:{i}") == f"{i}:{r}".encode()

        with trio.fail_after(40):
            async with trio.open_nursery() as watchers:
                watchers.start_soon(watch)
                async with trio.open_nursery() as nursery:
                    for i in range(callers):
                        nursery.start_soon(caller, i)
                done.set()
            assert await redis.get("shared") == str(callers * rounds).encode()
            values = await redis.mget(*[f"key:{i}" for i in range(callers)])
        assert values == [f"{i}:{rounds - 1}".encode() for i in range(callers)]
        stats = client.stats(redis.target)
        assert 1 <= most_open <= 8
        assert stats.created <= 8
        assert stats.created + stats.reused == callers * rounds * 3 + 2
        assert stats.failed == 0
        # Redis agrees: at most 8 clients were connected at once (plus none).
        clients = await redis.execute("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        assert 1 <= len(clients.splitlines()) <= 8
    # Leaving open_client closed every connection: no socket is left on our
    # side, and Redis sees only the connection that asks.
    assert open_fds() == fds_before
    stream = await trio.open_tcp_stream("127.0.0.1", redis_server.port)
    async with triocomm.Connection(stream, Resp()) as conn:
        await conn.send_many([command("AUTH", redis_server.password), command("CLIENT", "LIST")])
        assert await conn.receive() == "OK"
        listing = await conn.receive()
    assert isinstance(listing, bytes)
    assert len(listing.splitlines()) == 1


async def test_requests_fail_clearly_while_redis_is_down_and_recover(
    redis_server: RedisServer,
) -> None:
    """redis-server is restarted in the middle of a run of concurrent callers."""
    outcomes: dict[str, int] = {}
    messages: set[str] = set()
    phase = "up"
    async with triocomm.open_client(timeouts=triocomm.Timeouts(connect=5)) as client:
        redis = Redis(client, port=redis_server.port, password=redis_server.password)

        async def caller() -> None:
            # Bounded in count: at most 400 commands, 5 ms apart.
            for _ in range(400):
                name = phase
                try:
                    await redis.incr("counter")
                except (triocomm.ConnectError, triocomm.ConnectionLost) as exc:
                    # The errors a caller sees: Redis cannot be reached, or it
                    # went away mid-command.
                    messages.add(str(exc))
                    name += f" {type(exc).__name__}"
                else:
                    name += " ok"
                outcomes[name] = outcomes.get(name, 0) + 1
                if phase == "back" and outcomes.get("back ok", 0) >= 100:
                    return
                await trio.sleep(0.005)

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(caller)
                while outcomes.get("up ok", 0) < 100:
                    await trio.sleep(0.01)
                await redis_server.stop()
                phase = "down"
                # While it is down, a command fails at once with ConnectError,
                # naming the address, even though pooled connections existed.
                with pytest.raises(triocomm.ConnectError) as info:
                    await redis.ping()
                assert f"127.0.0.1:{redis_server.port}" in str(info.value)
                while outcomes.get("down ConnectError", 0) < 20:
                    await trio.sleep(0.01)
                phase = "restarting"
                await redis_server.start()
                phase = "back"
        # The same client object works again; the new server is empty.
        assert await redis.ping() == "PONG"
        counter = await redis.get("counter")
    assert outcomes.get("back ok", 0) >= 100
    # Every failure named the address it was about.
    assert messages
    assert all(str(redis_server.port) in message for message in messages), messages
    # A command that started once the server had exited never succeeded;
    # one that was in flight as it stopped may have failed either way.
    assert "down ok" not in outcomes
    assert set(outcomes) <= {
        "up ok", "up ConnectionLost", "up ConnectError",
        "down ConnectError", "down ConnectionLost",
        "restarting ok", "restarting ConnectError",
        "back ok",
    }  # fmt: skip
    # The restarted Redis started empty (no persistence): its counter holds
    # exactly the increments that succeeded after the restart.
    assert counter == b"%d" % (outcomes["back ok"] + outcomes.get("restarting ok", 0))
