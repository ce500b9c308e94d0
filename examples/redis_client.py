"""A small Redis client: a triocomm ``Target`` that speaks RESP, and a few commands.

Everything a Redis client needs besides the protocol comes from the
framework: :class:`Redis` wraps a ``triocomm.Client`` and one
``triocomm.Target`` (address, the RESP codec of ``examples/resp.py``, a pool
of at most ``max_connections`` keep-alive connections, time limits). Each
command is one session, ``client.request(target, command)``. The handshake,
``AUTH`` and ``SELECT``, is the target's ``on_connect``: it runs once on every
new connection, before its first command, so pooled connections are always
logged in and on the right database. A pipeline borrows one connection with
``client.run`` and writes all its commands with a single ``send_many``.

Failures surface as triocomm's errors: ``ConnectError`` when Redis cannot be
reached, ``CommTimeout`` when it is too slow, ``ConnectionLost`` when it goes
away mid-reply. When Redis answers with an error reply, the command raises
:class:`RedisError`. The client outlives a restart of Redis: broken pooled
connections are dropped and new ones are made (and logged in again) on demand.

Run it against a Redis server::

    python examples/redis_client.py --port 6379 [--password secret]
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import trio
from resp import ErrorReply, Resp, RespValue, command

import triocomm

__all__ = ["Handshake", "Redis", "RedisError", "main"]

#: The codec the client speaks (RESP2, with the default bounds).
CODEC = Resp()

Arg = bytes | str | int
_T = TypeVar("_T")


class RedisError(Exception):
    """Redis answered a command with an error reply.

    Attributes:
        reply: the :class:`~resp.ErrorReply` itself.
        command: the command's name, e.g. ``"INCR"``.
    """

    def __init__(self, reply: ErrorReply, command: str) -> None:
        super().__init__(f"{command}: {reply.message}")
        self.reply = reply
        self.command = command

    @property
    def code(self) -> str:
        """The error's first word: ``"ERR"``, ``"WRONGTYPE"``, ``"WRONGPASS"`` ..."""
        return self.reply.code


def _name(args: Sequence[Arg]) -> str:
    first = args[0] if args else ""
    return (first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)).upper()


def _check(reply: RespValue, args: Sequence[Arg]) -> RespValue:
    if isinstance(reply, ErrorReply):
        raise RedisError(reply, _name(args))
    return reply


@dataclass(frozen=True)
class Handshake:
    """The ``on_connect`` of a Redis target: ``AUTH`` and ``SELECT`` on every new connection.

    A frozen dataclass rather than a closure so that two :class:`Redis`
    objects with the same settings build *equal* targets, and so share one
    pool in a client. Both commands go out in one write; the password is
    kept out of ``repr``.

    Raises:
        RedisError: the server refused the password or the database number;
            the connection is closed and the command that needed it fails.
    """

    password: str | None = field(default=None, repr=False)
    username: str | None = None
    db: int = 0

    async def __call__(self, conn: triocomm.Connection[RespValue, RespValue]) -> None:
        commands: list[list[Arg]] = []
        if self.password is not None:
            if self.username is not None:
                commands.append(["AUTH", self.username, self.password])
            else:
                commands.append(["AUTH", self.password])
        if self.db:
            commands.append(["SELECT", self.db])
        await conn.send_many([command(*args) for args in commands])
        for args in commands:
            _check(await conn.receive(), args)


class Redis:
    """Redis commands over a triocomm client.

    Args:
        client: an open ``triocomm.Client`` (from ``triocomm.open_client()``);
            it owns the connections, so they close when it does.
        host, port: where Redis listens.
        password, username: for ``AUTH`` on each new connection (ACL users
            need both; the classic ``requirepass`` needs only ``password``).
        db: the database number to ``SELECT`` (0 needs no command).
        max_connections: the most connections at once; further commands wait
            for a free one.
        timeouts: a ``triocomm.Timeouts`` for this server (``None``: the
            client's).

    Example::

        async with triocomm.open_client() as client:
            redis = Redis(client, "127.0.0.1", 6379, password="secret")
            await redis.set("greeting", "hello")
            print(await redis.get("greeting"))   # b'hello'
    """

    def __init__(
        self,
        client: triocomm.Client,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        max_connections: int = 8,
        timeouts: triocomm.Timeouts | None = None,
    ) -> None:
        handshake = Handshake(password, username, db)
        needs_handshake = password is not None or db != 0
        self.client = client
        self.target: triocomm.Target[RespValue, RespValue] = triocomm.Target(
            host,
            port,
            CODEC,
            max_connections=max_connections,
            timeouts=timeouts,
            on_connect=handshake if needs_handshake else None,
        )

    async def execute(self, *args: Arg) -> RespValue:
        """Send one command and return its reply.

        Raises:
            RedisError: Redis answered with an error reply.
            triocomm.CommError: the command could not be sent or its reply
                not received (``ConnectError``, ``CommTimeout``, ...).
        """
        reply = await self.client.request(self.target, command(*args))
        return _check(reply, args)

    async def ping(self) -> str:
        """``PING``: returns ``"PONG"``."""
        return _expect(str, await self.execute("PING"), "PING")

    async def get(self, key: Arg) -> bytes | None:
        """``GET key``: the value, or ``None`` if the key does not exist."""
        reply = await self.execute("GET", key)
        return None if reply is None else _expect(bytes, reply, "GET")

    async def set(self, key: Arg, value: Arg) -> None:
        """``SET key value``."""
        _expect(str, await self.execute("SET", key, value), "SET")

    async def delete(self, *keys: Arg) -> int:
        """``DEL key ...``: how many of the keys existed."""
        return _expect(int, await self.execute("DEL", *keys), "DEL")

    async def incr(self, key: Arg) -> int:
        """``INCR key``: the value after adding 1 (a missing key counts as 0)."""
        return _expect(int, await self.execute("INCR", key), "INCR")

    async def mget(self, *keys: Arg) -> list[bytes | None]:
        """``MGET key ...``: each key's value, ``None`` for missing keys."""
        reply = _expect(list, await self.execute("MGET", *keys), "MGET")
        return [None if v is None else _expect(bytes, v, "MGET") for v in reply]

    async def pipeline(self, commands: Iterable[Sequence[Arg]]) -> list[RespValue | RedisError]:
        """Send many commands in one write on one connection; return every reply.

        The replies come back in order. A command that fails does not stop
        the others: its place in the list holds a :class:`RedisError` instead
        of raising it. Connection-level errors (``ConnectError``, timeouts,
        ``ConnectionLost``) do raise, for the pipeline as a whole.
        """
        batch = [tuple(args) for args in commands]
        if not batch:
            return []
        return await self.client.run(self.target, _pipeline_session, batch)


async def _pipeline_session(
    conn: triocomm.Connection[RespValue, RespValue], batch: list[tuple[Arg, ...]]
) -> list[RespValue | RedisError]:
    await conn.send_many([command(*args) for args in batch])
    results: list[RespValue | RedisError] = []
    for args in batch:
        # Every reply is read, errors included, so that the connection ends
        # the session in step and can go back to the pool.
        reply = await conn.receive()
        if isinstance(reply, ErrorReply):
            results.append(RedisError(reply, _name(args)))
        else:
            results.append(reply)
    return results


def _expect(kind: type[_T], reply: RespValue, name: str) -> _T:
    if not isinstance(reply, kind):
        raise triocomm.ProtocolError(f"{name} got an unexpected reply from Redis: {reply!r}")
    return reply


async def main(argv: list[str] | None = None) -> None:
    """A short tour of the commands against a running Redis."""
    parser = argparse.ArgumentParser(description="Talk to a Redis server through triocomm.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--password", action="store_true", help="ask for the password")
    parser.add_argument("--db", type=int, default=0)
    args = parser.parse_args(argv)
    password = getpass.getpass() if args.password else None
    async with triocomm.open_client() as client:
        redis = Redis(client, args.host, args.port, password=password, db=args.db)
        print("PING ->", await redis.ping())
        await redis.set("triocomm:example", "hello")
        print("GET ->", await redis.get("triocomm:example"))
        print("INCR ->", await redis.incr("triocomm:counter"))
        replies = await redis.pipeline([("INCR", "triocomm:counter")] * 3)
        print("pipeline of 3 INCR ->", replies)
        print("DEL ->", await redis.delete("triocomm:example", "triocomm:counter"))


if __name__ == "__main__":
    trio.run(main)
