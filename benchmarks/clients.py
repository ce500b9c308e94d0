"""The RPC echo clients that the benchmark compares, one per ``--kind``.

Both run ``--conns`` tasks doing ping-pong against one fixed fast server
(the uvloop protocol server of ``servers.py``, on the other core):

``triocomm``  ``client.request(target, payload)`` through the pool of
              ``triocomm.open_client``, with its default timeouts;
``raw-trio``  one ``trio.open_tcp_stream`` per task, ``send_all`` the frame,
              ``receive_some`` into a ``bytearray`` until the reply frame is
              complete, as a user would write it by hand.

Every reply payload is compared with the request payload. Run as ``python
benchmarks/clients.py --kind raw-trio --port P --conns 64 --duration 2``; it
prints one JSON object with ``requests_per_s``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import harness
import trio

HOST = "127.0.0.1"
KINDS = ("triocomm", "raw-trio")
VARIANTS = 4
RECEIVE_SIZE = 65536


class BenchmarkError(Exception):
    """A reply did not match its request."""


class Counter:
    """Replies counted across every task, and when to stop."""

    def __init__(self) -> None:
        self.done = 0
        self.running = True
        self.errors: list[str] = []


async def _guarded(worker: Worker, index: int, counter: Counter) -> None:
    # A failing worker stops the run and reports, instead of raising an
    # exception group out of the nursery.
    try:
        await worker(index, counter)
    except Exception as exc:
        counter.errors.append(f"{type(exc).__name__}: {exc}")
        counter.running = False


Worker = Callable[[int, Counter], Awaitable[None]]


def raw_trio_worker(port: int, size: int) -> Worker:
    async def worker(index: int, counter: Counter) -> None:
        payloads = harness.payloads(size, VARIANTS, salt=index)
        unpack_from = harness.HEADER.unpack_from
        pack = harness.HEADER.pack
        stream = await trio.open_tcp_stream(HOST, port)
        async with stream:
            buf = bytearray()
            i = 0
            while counter.running:
                payload = payloads[i % VARIANTS]
                i += 1
                await stream.send_all(pack(len(payload)) + payload)
                while True:
                    if len(buf) >= 4:
                        (n,) = unpack_from(buf)
                        if len(buf) >= 4 + n:
                            break
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise BenchmarkError(f"task {index}: server closed the connection")
                    buf += data
                reply = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                if reply != payload:
                    raise BenchmarkError(f"task {index}: wrong reply")
                counter.done += 1

    return worker


def triocomm_worker(client: Any, target: Any, size: int) -> Worker:
    async def worker(index: int, counter: Counter) -> None:
        payloads = harness.payloads(size, VARIANTS, salt=index)
        request = client.request
        i = 0
        while counter.running:
            payload = payloads[i % VARIANTS]
            i += 1
            reply = await request(target, payload)
            if reply != payload:
                raise BenchmarkError(f"task {index}: wrong reply")
            counter.done += 1

    return worker


async def drive(worker: Worker, conns: int, duration: float, warmup: float) -> dict[str, Any]:
    """Run ``conns`` workers; count replies during ``duration`` after ``warmup``."""
    counter = Counter()
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(_guarded, worker, i, counter)
        await trio.sleep(warmup)
        start_count = counter.done
        start = time.perf_counter()
        start_cpu = time.process_time()
        await trio.sleep(duration)
        count = counter.done - start_count
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - start_cpu
        # Workers finish the request in flight and stop: nothing is cut off.
        counter.running = False
    if counter.errors:
        raise BenchmarkError("; ".join(counter.errors[:3]))
    result["requests"] = count
    result["seconds"] = elapsed
    result["requests_per_s"] = count / elapsed
    result["cpu_us_per_request"] = cpu / max(count, 1) * 1e6
    return result


async def measure(
    kind: str, port: int, *, conns: int, size: int, duration: float, warmup: float
) -> dict[str, Any]:
    """Drive the echo server at ``port`` with the client ``kind``; see the module doc."""
    if kind == "raw-trio":
        return await drive(raw_trio_worker(port, size), conns, duration, warmup)
    import triocomm

    target = triocomm.Target(  # type: ignore[attr-defined]
        HOST, port, triocomm.LengthPrefixed(), max_connections=max(conns, 1)
    )
    async with triocomm.open_client() as client:  # type: ignore[attr-defined]
        return await drive(triocomm_worker(client, target, size), conns, duration, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--core", type=int, default=None)
    args = parser.parse_args(argv)
    harness.pin_to_core(args.core)
    harness.raise_nofile_limit()
    try:
        result = trio.run(
            lambda: measure(
                args.kind,
                args.port,
                conns=args.conns,
                size=args.size,
                duration=args.duration,
                warmup=args.warmup,
            )
        )
    except (BenchmarkError, OSError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
