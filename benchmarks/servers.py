"""The RPC echo servers that the benchmark compares, one per ``--kind``.

Every server speaks the same protocol (a 4-byte big-endian length, then the
payload) and answers each frame with the same frame. They are written the
way a user of each stack would write them, without tricks:

``triocomm``          ``triocomm.serve`` with an echo handler and its default
                      timeouts (so the cost of the limits is measured too);
``raw-trio``          ``trio.serve_tcp``, one ``bytearray`` per connection,
                      every buffered frame parsed, one ``send_all`` per batch;
``asyncio-streams``   ``asyncio.start_server``, ``readexactly`` + ``drain``;
``asyncio-protocol``  an ``asyncio.Protocol`` on the default event loop;
``uvloop-protocol``   the same protocol class on uvloop.

Run as ``python benchmarks/servers.py --kind raw-trio --port 0 [--core 0]``:
the program prints ``PORT <n>`` once it listens and runs until its standard
input is closed (the benchmark driver closes it to stop the server).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import threading
from typing import Any

import harness

HOST = "127.0.0.1"
KINDS = (
    "triocomm",
    "raw-trio",
    "asyncio-streams",
    "asyncio-protocol",
    "uvloop-protocol",
    "trio-connection",
)
RECEIVE_SIZE = 65536
# The memory benchmark holds 10,000 connections open on one server.
MAX_CONNECTIONS = 100_000
_unpack_from = harness.HEADER.unpack_from


def _announce(port: int) -> None:
    print(f"PORT {port}", flush=True)


def _exit_when_stdin_closes() -> None:
    # A blocked reader thread costs nothing while the server runs, and works
    # the same for every event loop below.
    def wait() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


# -- raw Trio ------------------------------------------------------------------


async def raw_trio_echo(stream: Any) -> None:
    """One connection of the hand-written Trio server."""
    import trio

    buf = bytearray()
    receive_some = stream.receive_some
    send_all = stream.send_all
    try:
        while True:
            data = await receive_some(RECEIVE_SIZE)
            if not data:
                return
            buf += data
            pos = 0
            end = len(buf)
            out = bytearray()
            while end - pos >= 4:
                (size,) = _unpack_from(buf, pos)
                stop = pos + 4 + size
                if stop > end:
                    break
                out += buf[pos:stop]
                pos = stop
            if pos:
                del buf[:pos]
            if out:
                await send_all(out)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def run_raw_trio(port: int) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, raw_trio_echo, port, host=HOST)
        listeners = await nursery.start(serve)
        _announce(listeners[0].socket.getsockname()[1])


# -- triocomm ------------------------------------------------------------------


async def run_triocomm(port: int) -> None:
    import trio

    import triocomm

    async def echo(request: bytes, conn: Any) -> bytes:
        return request

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                triocomm.serve,  # type: ignore[attr-defined]
                echo,
                port,
                host=HOST,
                codec=triocomm.LengthPrefixed(),
                max_connections=MAX_CONNECTIONS,
            )
        )
        _announce(server.port)


async def run_trio_connection(port: int) -> None:
    """A bare ``triocomm.Connection`` echo loop on ``trio.serve_tcp``.

    Not one of the compared servers: it isolates the cost of the Connection
    layer from the cost of the server layer when profiling.
    """
    import trio

    import triocomm
    from triocomm._timeouts import Limits

    codec = triocomm.LengthPrefixed()
    unlimited = Limits()

    async def reply(request: bytes, conn: Any) -> bytes:
        return request

    async def echo(stream: Any) -> None:
        conn: Any = triocomm.Connection(stream, codec)
        try:
            async for request in conn:
                await conn._answer(reply, request, unlimited)
        except trio.BrokenResourceError:
            pass
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, port, host=HOST))
        _announce(listeners[0].socket.getsockname()[1])


# -- asyncio -------------------------------------------------------------------


async def asyncio_streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection of the asyncio streams server."""
    try:
        while True:
            header = await reader.readexactly(4)
            (size,) = _unpack_from(header)
            payload = await reader.readexactly(size)
            writer.write(header + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class EchoProtocol(asyncio.Protocol):
    """The asyncio / uvloop protocol server: buffer, parse every frame, one write."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        end = len(buf)
        out = bytearray()
        while end - pos >= 4:
            (size,) = _unpack_from(buf, pos)
            stop = pos + 4 + size
            if stop > end:
                break
            out += buf[pos:stop]
            pos = stop
        if pos:
            del buf[:pos]
        if out:
            self.transport.write(out)


async def run_asyncio(kind: str, port: int) -> None:
    if kind == "asyncio-streams":
        server = await asyncio.start_server(asyncio_streams_echo, HOST, port, backlog=4096)
    else:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(EchoProtocol, HOST, port, backlog=4096)
    _announce(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--core", type=int, default=None)
    args = parser.parse_args(argv)
    harness.pin_to_core(args.core)
    harness.raise_nofile_limit()
    _exit_when_stdin_closes()
    if args.kind == "raw-trio":
        import trio

        trio.run(run_raw_trio, args.port)
    elif args.kind == "triocomm":
        import trio

        trio.run(run_triocomm, args.port)
    elif args.kind == "trio-connection":
        import trio

        trio.run(run_trio_connection, args.port)
    elif args.kind == "uvloop-protocol":
        import uvloop

        uvloop.run(run_asyncio(args.kind, args.port))
    else:
        asyncio.run(run_asyncio(args.kind, args.port))


if __name__ == "__main__":
    main()
