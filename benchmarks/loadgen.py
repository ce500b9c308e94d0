"""The fixed load generator: drives any RPC echo server and checks every reply.

It is an ``asyncio.Protocol`` on uvloop (the fastest Python event loop at
hand), pinned to its own core, so that it is never the slower side of a
measurement against a Python server. Each connection keeps ``depth``
requests in flight: with depth 1 that is ping-pong; with a larger depth,
every reply that completes is replaced by a new request, all the new
requests of one read going out in one write.

Every reply is compared byte for byte with the request it answers (requests
cycle through a few distinct payloads, different on every connection), so a
server that loses, reorders or mixes up frames fails the run instead of
looking fast.

Run as ``python benchmarks/loadgen.py --port P --conns 64 --size 64
--depth 1 --duration 2``; it prints one JSON object with ``requests_per_s``.
``--loop asyncio`` uses the default event loop (for machines without uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import harness

HOST = "127.0.0.1"
VARIANTS = 4


class BenchmarkError(Exception):
    """A server answered wrongly or went away during a run."""


class Pinger(asyncio.Protocol):
    """One connection of the load generator."""

    def __init__(self, frames: list[bytes], depth: int, run: Run) -> None:
        self.frames = frames
        self.frame_size = len(frames[0])
        self.depth = depth
        self.run = run
        # The bytes still owed by the server, in order.
        self.expected = bytearray()
        self.sent = 0
        self.done = 0
        self.received = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.send(self.depth)

    def send(self, count: int) -> None:
        frames = self.frames
        n = len(frames)
        first = self.sent
        if count == 1:
            chunk = frames[first % n]
        else:
            chunk = b"".join([frames[(first + i) % n] for i in range(count)])
        self.sent += count
        self.expected += chunk
        self.transport.write(chunk)

    def data_received(self, data: bytes) -> None:
        size = len(data)
        expected = self.expected
        if expected[:size] != data:
            self.run.fail(f"connection {self.run.index(self)}: wrong reply bytes")
            self.transport.abort()
            return
        del expected[:size]
        self.received += size
        completed = self.received // self.frame_size - self.done
        if completed:
            self.done += completed
            if self.run.running:
                self.send(completed)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.run.running:
            self.run.fail(f"connection {self.run.index(self)} lost: {exc!r}")


class Run:
    """The connections of one measurement and its outcome."""

    def __init__(self) -> None:
        self.pingers: list[Pinger] = []
        self.running = True
        self.errors: list[str] = []
        self.failed = asyncio.Event()

    def index(self, pinger: Pinger) -> int:
        return self.pingers.index(pinger)

    def fail(self, message: str) -> None:
        self.errors.append(message)
        self.failed.set()

    def completed(self) -> int:
        return sum(p.done for p in self.pingers)


async def measure(
    port: int,
    *,
    conns: int,
    size: int,
    depth: int,
    duration: float,
    warmup: float,
    requests: int | None = None,
    host: str = HOST,
) -> dict[str, Any]:
    """Load the server at ``host:port`` and return what was measured.

    Runs ``warmup`` seconds unmeasured, then counts replies for ``duration``
    seconds (or until ``requests`` replies, if given). Raises
    :class:`BenchmarkError` if any reply was wrong or a connection was lost.
    """
    loop = asyncio.get_running_loop()
    run = Run()
    for i in range(conns):
        frames = [harness.frame(p) for p in harness.payloads(size, VARIANTS, salt=i)]
        pinger = Pinger(frames, depth, run)
        run.pingers.append(pinger)
        await loop.create_connection(lambda p=pinger: p, host, port)  # type: ignore[misc]
    try:
        await asyncio.wait_for(run.failed.wait(), warmup)
    except asyncio.TimeoutError:
        pass
    start_count = run.completed()
    start = time.perf_counter()
    if requests is None:
        try:
            await asyncio.wait_for(run.failed.wait(), duration)
        except asyncio.TimeoutError:
            pass
    else:
        deadline = start + duration
        while run.completed() - start_count < requests and not run.errors:
            if time.perf_counter() > deadline:
                run.fail(f"only {run.completed() - start_count} of {requests} replies in time")
                break
            await asyncio.sleep(0.005)
    end_count = run.completed()
    elapsed = time.perf_counter() - start
    run.running = False
    for p in run.pingers:
        p.transport.close()
    # Let the transports finish closing before the loop is torn down.
    await asyncio.sleep(0)
    if run.errors:
        raise BenchmarkError("; ".join(run.errors[:3]))
    count = end_count - start_count
    return {
        # Every reply, warm-up included: what the server's CPU time covers.
        "total_requests": end_count,
        "requests": count,
        "seconds": elapsed,
        "requests_per_s": count / elapsed,
        "mb_per_s": count * 2 * (size + 4) / elapsed / 1e6,
    }


def run_loop(coro: Any, loop_name: str) -> Any:
    """Run ``coro`` on uvloop or on asyncio's default loop."""
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    harness.pin_to_core(args.core)
    try:
        result = run_loop(
            measure(
                args.port,
                conns=args.conns,
                size=args.size,
                depth=args.depth,
                duration=args.duration,
                warmup=args.warmup,
                requests=args.requests,
            ),
            args.loop,
        )
    except (BenchmarkError, OSError) as exc:
        print(json.dumps({"error": str(exc)}))
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
