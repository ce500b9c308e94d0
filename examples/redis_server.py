"""A small Redis-compatible server: a subset of commands over an in-memory dict.

It is the request/reply shape that ``triocomm.serve`` is made for: every
command is one passive session, ``handle(request, conn)`` returns the reply,
and the service does the rest (accepting, reading ahead pipelined commands,
answering them in order with one write per batch, timeouts, shutdown). The
wire format is the RESP2 codec of ``examples/resp.py`` with inline commands
enabled, so ``redis-cli``, ``redis-benchmark`` (including its ``PING_INLINE``
test) and any Redis client library can talk to it.

Commands: PING, ECHO, GET, SET, DEL, INCR, MGET, MSET, and ``CONFIG GET`` for
the two settings ``redis-benchmark`` asks about. Keys and values are bytes;
nothing is persisted.

Run it::

    python examples/redis_server.py --port 7379
    redis-cli -p 7379 SET greeting hello
    redis-benchmark -p 7379 -t ping,set,get,incr -P 16 -c 50 -q

It prints one line saying where it listens (``--port 0`` picks a free port)
and serves until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from collections import Counter
from collections.abc import Callable

import trio
from resp import NULL, ErrorReply, Null, Resp, RespValue

import triocomm

__all__ = ["RedisStore", "main", "serve_redis"]

#: How long requests in flight may run on after SIGINT or SIGTERM, in seconds.
GRACE = 5.0

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: The codec of this server: RESP2, accepting inline commands as well.
CODEC = Resp(inline=True)

#: The service's time limits: the defaults, plus a bound on each command
#: (``receive``: first byte to last), so that a client trickling a command a
#: byte at a time cannot hold a connection open for ever.
TIMEOUTS = triocomm.ServerTimeouts(receive=10.0)

Command = Callable[["RedisStore", list[bytes]], "RespValue | Null"]


class RedisStore:
    """The keyspace and the commands that act on it.

    :meth:`handle` is the ``serve`` handler. Commands are plain functions of
    the store and their arguments: nothing here awaits, so one command runs
    to completion before the next starts, which is what makes each command
    atomic, as in Redis.

    Attributes:
        data: the keyspace, ``bytes`` keys to ``bytes`` values.
        calls: how many times each known command ran (by upper-case name).
        commands_served: how many commands were answered (errors included).
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.calls: Counter[bytes] = Counter()
        self.commands_served = 0

    async def handle(
        self, request: RespValue, conn: triocomm.Connection[RespValue, RespValue | Null]
    ) -> RespValue | Null:
        """Answer one command (an array of bulk strings) with its reply.

        Mistakes in a command (unknown name, wrong number of arguments, a
        value that is not an integer) are answered with an error reply, as
        Redis does; the connection stays open.
        """
        self.commands_served += 1
        if not isinstance(request, list) or not request:
            return ErrorReply("ERR Protocol error: expected an array of bulk strings")
        args: list[bytes] = []
        for arg in request:
            if not isinstance(arg, bytes):
                return ErrorReply("ERR Protocol error: expected an array of bulk strings")
            args.append(arg)
        name = args[0].upper()
        entry = COMMANDS.get(name)
        if entry is None:
            shown = args[0][:64].decode("utf-8", "replace")
            return ErrorReply(f"ERR unknown command '{shown}'")
        command, min_args, max_args = entry
        self.calls[name] += 1
        count = len(args) - 1
        if count < min_args or (max_args is not None and count > max_args):
            return ErrorReply(
                f"ERR wrong number of arguments for '{name.decode().lower()}' command"
            )
        return command(self, args)

    def ping(self, args: list[bytes]) -> RespValue:
        return args[1] if len(args) > 1 else "PONG"

    def echo(self, args: list[bytes]) -> RespValue:
        return args[1]

    def get(self, args: list[bytes]) -> RespValue | Null:
        # NULL, not None: for `serve`, None would mean "send no reply".
        return self.data.get(args[1], NULL)

    def set(self, args: list[bytes]) -> RespValue:
        if len(args) > 3:
            # EX, PX, NX, XX, GET ... are not part of this subset.
            return ErrorReply("ERR syntax error")
        self.data[args[1]] = args[2]
        return "OK"

    def delete(self, args: list[bytes]) -> RespValue:
        data = self.data
        removed = 0
        for key in args[1:]:
            if data.pop(key, None) is not None:
                removed += 1
        return removed

    def incr(self, args: list[bytes]) -> RespValue:
        current = self.data.get(args[1], b"0")
        # Redis accepts only a canonical decimal: no spaces, no "+", no "0x".
        body = current[1:] if current[:1] == b"-" else current
        if not body.isdigit() or len(current) > 20 or (len(body) > 1 and body[:1] == b"0"):
            return ErrorReply("ERR value is not an integer or out of range")
        value = int(current)
        if not INT64_MIN <= value < INT64_MAX:
            if value == INT64_MAX:
                return ErrorReply("ERR increment or decrement would overflow")
            return ErrorReply("ERR value is not an integer or out of range")
        value += 1
        self.data[args[1]] = b"%d" % value
        return value

    def mget(self, args: list[bytes]) -> RespValue:
        get = self.data.get
        return [get(key) for key in args[1:]]

    def mset(self, args: list[bytes]) -> RespValue:
        if len(args) % 2 == 0:
            return ErrorReply("ERR wrong number of arguments for 'mset' command")
        for i in range(1, len(args), 2):
            self.data[args[i]] = args[i + 1]
        return "OK"

    def config(self, args: list[bytes]) -> RespValue:
        if args[1].upper() != b"GET" or len(args) != 3:
            return ErrorReply("ERR only CONFIG GET <parameter> is supported")
        # True of this server: it never saves and keeps no append-only file.
        known = {b"save": b"", b"appendonly": b"no"}
        parameter = args[2].lower()
        return [parameter, known[parameter]] if parameter in known else []


#: Command name -> (method, least arguments, most arguments or None).
COMMANDS: dict[bytes, tuple[Command, int, int | None]] = {
    b"PING": (RedisStore.ping, 0, 1),
    b"ECHO": (RedisStore.echo, 1, 1),
    b"GET": (RedisStore.get, 1, 1),
    b"SET": (RedisStore.set, 2, None),
    b"DEL": (RedisStore.delete, 1, None),
    b"INCR": (RedisStore.incr, 1, 1),
    b"MGET": (RedisStore.mget, 1, None),
    b"MSET": (RedisStore.mset, 2, None),
    b"CONFIG": (RedisStore.config, 2, None),
}


async def serve_redis(
    store: RedisStore,
    port: int = 7379,
    *,
    host: str | None = "127.0.0.1",
    timeouts: triocomm.ServerTimeouts = TIMEOUTS,
    task_status: trio.TaskStatus[triocomm.Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``store`` over RESP on ``host:port`` until cancelled or shut down.

    Use it with ``nursery.start`` to learn the bound port (``port=0`` picks a
    free one)::

        server = await nursery.start(serve_redis, RedisStore(), 0)
    """
    await triocomm.serve(
        store.handle,
        port,
        host=host,
        codec=CODEC,
        timeouts=timeouts,
        max_connections=10_000,
        task_status=task_status,
    )


async def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM, then shut down gracefully."""
    parser = argparse.ArgumentParser(description="A Redis-compatible server on triocomm.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7379)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # SIGINT (Ctrl-C) and SIGTERM arrive as messages, not as exceptions. The
    # receiver opens before the port is printed, so no signal is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            serving = functools.partial(serve_redis, RedisStore(), args.port, host=args.host)
            server: triocomm.Server = await nursery.start(serving)
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"redis_server: listening on {host}:{server.port}", flush=True)
            async for signum in signals:
                signame = signal.Signals(signum).name
                print(f"redis_server: {signame} received, shutting down", flush=True)
                break
            # Stop accepting, let requests in flight finish (GRACE s at most).
            await server.shutdown(grace=GRACE)


if __name__ == "__main__":
    trio.run(main)
