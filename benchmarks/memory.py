"""The idle-connection memory benchmark: what one keep-alive connection costs a server.

The driver starts a server (``servers.py``), reads its resident memory once
it has served one warm-up request (the baseline), then runs this program on
the other core: it opens ``--conns`` connections, completes one echo
request on each (so the server has really accepted every one and is holding
it between requests, as a keep-alive server does), prints ``READY <n>`` and
holds them all idle until its standard input closes. The driver reads the
server's memory again; the difference divided by the number of connections
is the cost of one idle connection.

Both processes raise their soft limit on open files to the hard limit, since
10,000 connections need more than the usual 1,024 descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import harness
import loadgen

HOST = "127.0.0.1"
# Connects in flight at once: more would overflow the listen backlog.
CONNECT_BATCH = 256


class OneShot(asyncio.Protocol):
    """Sends one frame, checks its echo, then stays connected and silent."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.received = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.request) and not self.done.done():
            if self.received == self.request:
                self.done.set_result(None)
            else:
                self.done.set_exception(RuntimeError("wrong echo"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc!r}"))


async def hold(port: int, conns: int, wait_for_stdin: bool = True) -> list[Any]:
    """Open ``conns`` connections with one echo each; return their transports."""
    loop = asyncio.get_running_loop()
    request = harness.frame(b"m" * 64)
    transports: list[Any] = []

    async def one() -> None:
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(lambda: OneShot(request, done), HOST, port)
        transports.append(transport)
        await asyncio.wait_for(done, 30)

    for start in range(0, conns, CONNECT_BATCH):
        await asyncio.gather(*(one() for _ in range(min(CONNECT_BATCH, conns - start))))
    if wait_for_stdin:
        print(f"READY {len(transports)}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        for t in transports:
            t.close()
    return transports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    harness.pin_to_core(args.core)
    harness.raise_nofile_limit()
    loadgen.run_loop(hold(args.port, args.conns), args.loop)


if __name__ == "__main__":
    main()
