"""Work per request counted in machine instructions: an A/B that machine load cannot move.

CPU time per request (``run.py``) moves by 10-20 % between runs on a shared
machine, which hides the few per cent a change to the request path costs or
saves. This program counts instructions instead, with Valgrind's cachegrind
(``apt-get install valgrind``), on an in-process echo:

``server``  ``triocomm.serve`` (default timeouts) and raw-Trio client tasks
            in one process: ``--conns`` connections, ``--depth`` requests in
            flight on each, ``--size``-byte payloads;
``client``  ``client.request`` from ``--conns`` tasks against a raw-Trio echo
            server in the same process.

The raw-Trio half is the same code for every version of triocomm, so the
difference between two versions is theirs. To make runs of one version agree
to about 0.1 %, Trio's scheduler is seeded, the garbage collector is off (a
collection landing in one measured window and not the other moves a figure
by up to 2 %) and the client runs on a frozen ``MockClock`` (it never
sleeps, and no wall-clock deadline may change its path). The figure is
(instructions for 2N requests - instructions for N) / N per connection, so
start-up and warm-up cancel out.

    python benchmarks/instructions.py server --conns 64 --depth 1 --requests 200
    python benchmarks/instructions.py client --conns 1 --requests 2000 --vs ../other/src

``--vs`` counts the same workload with another triocomm source tree (the
``src`` directory of a checkout of another version) and prints the ratio.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
HEADER_SIZE = 4


def _echo_frames(buf: bytearray) -> bytes:
    """Take the whole frames at the front of ``buf`` and return them (an echo)."""
    out = bytearray()
    while len(buf) >= HEADER_SIZE:
        n = int.from_bytes(buf[:HEADER_SIZE], "big")
        if len(buf) < HEADER_SIZE + n:
            break
        out += buf[: HEADER_SIZE + n]
        del buf[: HEADER_SIZE + n]
    return bytes(out)


async def _server_workload(conns: int, depth: int, per_conn: int, size: int) -> None:
    import trio

    import triocomm

    frame = size.to_bytes(HEADER_SIZE, "big") + b"x" * size

    async def echo(request: bytes, conn: Any) -> bytes:
        return request

    async def client(port: int, count: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        batch = frame * depth
        async with stream:
            for _ in range(count // depth):
                await stream.send_all(batch)
                got = 0
                while got < len(batch):
                    got += len(await stream.receive_some(65536))

    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            triocomm.serve, echo, 0, host="127.0.0.1", codec=triocomm.LengthPrefixed()
        )
        server = await nursery.start(serve)
        for count in (depth * 4, per_conn):  # a warm-up, then the measured requests
            async with trio.open_nursery() as clients:
                for _ in range(conns):
                    clients.start_soon(client, server.port, count)
        nursery.cancel_scope.cancel()


async def _client_workload(conns: int, per_conn: int, size: int) -> None:
    import trio

    import triocomm

    payload = b"x" * size

    async def echo(stream: Any) -> None:
        buf = bytearray()
        async with stream:
            while data := await stream.receive_some(65536):
                buf += data
                if out := _echo_frames(buf):
                    await stream.send_all(out)

    async def worker(client: Any, target: Any, count: int) -> None:
        for _ in range(count):
            if await client.request(target, payload) != payload:
                raise AssertionError("wrong reply")

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        port = (await nursery.start(serve))[0].socket.getsockname()[1]
        codec = triocomm.LengthPrefixed()
        target = triocomm.Target("127.0.0.1", port, codec, max_connections=max(conns, 1))
        async with triocomm.open_client() as client:
            for count in (4, per_conn):  # a warm-up, then the measured requests
                async with trio.open_nursery() as workers:
                    for _ in range(conns):
                        workers.start_soon(worker, client, target, count)
        nursery.cancel_scope.cancel()


def run_workload(kind: str, conns: int, depth: int, per_conn: int, size: int) -> None:
    """Run one workload in this process, made repeatable (see the module doc)."""
    import trio
    import trio.testing
    from trio._core import _run

    _run._r.seed(0)  # Trio's scheduler shuffles runnable tasks with this generator
    gc.disable()
    if kind == "server":
        trio.run(_server_workload, conns, depth, per_conn, size)
    else:
        trio.run(_client_workload, conns, per_conn, size, clock=trio.testing.MockClock())


def count_instructions(src: Path, args: argparse.Namespace, per_conn: int) -> int:
    """Instructions executed by the workload with ``per_conn`` requests per connection."""
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONHASHSEED="0")
    command = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, args.kind, "--inner",
        "--conns", str(args.conns), "--depth", str(args.depth),
        "--requests", str(per_conn), "--size", str(args.size),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_request(src: Path, args: argparse.Namespace) -> float:
    """Instructions per request: (count for 2N - count for N) / (conns * N)."""
    once = count_instructions(src, args, args.requests)
    twice = count_instructions(src, args, 2 * args.requests)
    return (twice - once) / (args.conns * args.requests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("server", "client"))
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--depth", type=int, default=1, help="requests in flight (server)")
    parser.add_argument("--requests", type=int, default=2000, help="N, per connection")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vs", type=Path, help="another triocomm src tree to compare")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests % args.depth:
        parser.error("--requests must be a multiple of --depth")
    if args.inner:
        run_workload(args.kind, args.conns, args.depth, args.requests, args.size)
        return
    this = per_request(Path(os.environ.get("PYTHONPATH") or SRC), args)
    print(f"{args.kind}: {this:,.0f} instructions per request")
    if args.vs is not None:
        other = per_request(args.vs, args)
        print(f"{args.vs}: {other:,.0f} instructions per request; ratio {this / other:.3f}")


if __name__ == "__main__":
    main()
