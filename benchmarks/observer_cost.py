"""What an observer costs per request: an in-process ``serve`` echo, with and without one.

One process holds the service and raw-Trio clients (pipelined length-prefixed
frames over loopback), so the clients' share is the same in every mode and a
difference between modes is the service's. Each mode runs its clients twice,
``N`` and ``2N`` requests per connection; under a CPU-instruction counter the
start-up cancels out as ``(I(2N) - I(N)) / requests`` (load-independent, so
valid on a busy machine). Run it under cachegrind, e.g.::

    for mode in none sessions prometheus; do for n in 1000 2000; do
      valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        python benchmarks/observer_cost.py --observer $mode --per-conn $n
    done; done

and take the difference of the ``I refs`` lines. Without valgrind it prints
the process CPU time per request of the measured run (noisy on a shared
machine; use it only as a rough check).
"""

from __future__ import annotations

import argparse
import functools
import struct
import time
from typing import Any

import trio

import triocomm

PAYLOAD = b"x" * 64
FRAME = struct.pack("!I", len(PAYLOAD)) + PAYLOAD


async def echo(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
    return request


async def client(port: int, depth: int, per_conn: int) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    batch = FRAME * depth
    async with stream:
        for _ in range(per_conn // depth):
            await stream.send_all(batch)
            got = 0
            while got < len(batch):
                got += len(await stream.receive_some(65536))


class SessionCounter(triocomm.Observer):
    """The least an observer of sessions can do: the cost of watching sessions at all."""

    def __init__(self) -> None:
        self.sessions = 0

    def session_ended(
        self, conn: triocomm.Connection[Any, Any], error: BaseException | None, duration: float
    ) -> None:
        self.sessions += 1


def observers(mode: str) -> list[triocomm.Observer]:
    if mode == "none":
        return []
    if mode == "empty":
        return [triocomm.Observer()]
    if mode == "sessions":
        return [SessionCounter()]
    from prometheus_client import CollectorRegistry

    from triocomm.contrib.prometheus import PrometheusObserver

    return [PrometheusObserver(CollectorRegistry())]


async def main(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        server: Any = await nursery.start(
            functools.partial(
                triocomm.serve,
                echo,
                0,
                host="127.0.0.1",
                codec=triocomm.LengthPrefixed(),
                observers=observers(args.observer),
            )
        )
        started = time.process_time()
        async with trio.open_nursery() as clients:
            for _ in range(args.conns):
                clients.start_soon(client, server.port, args.depth, args.per_conn)
        cpu = time.process_time() - started
        nursery.cancel_scope.cancel()
    requests = args.conns * (args.per_conn // args.depth) * args.depth
    print(f"{args.observer}: {cpu / requests * 1e6:.2f} us CPU/request over {requests} requests")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--observer", choices=["none", "empty", "sessions", "prometheus"], default="none"
    )
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--per-conn", type=int, default=2000)
    trio.run(main, parser.parse_args())
