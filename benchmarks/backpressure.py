"""The never-reading client benchmark: what a client that pipelines and never reads costs a server.

A triocomm ``serve`` service (in its own process, started by this program
with ``--serve``) answers every tiny request with a large reply (256 KiB by
default). The driver reads the server's resident memory once it has served
one warm-up request (the baseline), then opens ``--conns`` connections,
writes ``--requests`` pipelined 8-byte requests on each in one go, and never
reads a byte. Once the server's memory stops growing (or after ``--settle``
seconds), the growth divided by the number of connections is the figure:
with TCP back-pressure it is about one reply batch, whatever the client
asks for; without it, it grows with the number of requests.

Run ``python benchmarks/backpressure.py`` for one measurement, or as the
``backpressure`` part of ``benchmarks/run.py``.
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
import time
from typing import Any

import harness

HOST = "127.0.0.1"
REPLY_SIZE = 256 * 1024
REQUEST = harness.frame(b"r" * 8)
# RSS is sampled this often, and counts as settled once this many samples in a row agree.
SAMPLE_EVERY = 0.1
STABLE_SAMPLES = 5


# -- the server (its own process) ------------------------------------------------


async def serve(port: int, reply_size: int) -> None:
    """A triocomm service whose handler builds a ``reply_size``-byte reply per request."""
    import trio

    import triocomm

    async def answer(request: bytes, conn: Any) -> bytes:
        return bytes(reply_size)  # a fresh reply each time, as a real handler builds one

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                triocomm.serve, answer, port, host=HOST, codec=triocomm.LengthPrefixed()
            )
        )
        print(f"PORT {server.port}", flush=True)
        # Runs until the driver closes standard input.
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


# -- the driver ------------------------------------------------------------------


class ServerProcess(harness.ServerProcess):
    """This module's server in a subprocess, pinned to the server core."""

    def __init__(self, reply_size: int, core: int | None) -> None:
        super().__init__("triocomm", core=core)
        self.cmd = [sys.executable, __file__, "--serve", "--reply-size", str(reply_size)]
        if core is not None:
            self.cmd += ["--core", str(core)]


def warm_up(port: int, reply_size: int) -> None:
    """One request and its whole reply, so one-time costs land in the baseline."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(REQUEST)
        want = 4 + reply_size
        got = 0
        while got < want:
            chunk = sock.recv(want - got)
            if not chunk:
                raise RuntimeError("the server closed during the warm-up")
            got += len(chunk)


def settled_rss(pid: int, limit: float) -> tuple[int, float]:
    """The server's RSS (KiB) once it stops changing, and how long that took (``limit`` at most)."""
    started = time.monotonic()
    samples = [harness.rss_kib(pid)]
    while time.monotonic() - started < limit:
        time.sleep(SAMPLE_EVERY)
        samples.append(harness.rss_kib(pid))
        recent = samples[-STABLE_SAMPLES:]
        if len(recent) == STABLE_SAMPLES and max(recent) - min(recent) <= 64:
            break
    return samples[-1], time.monotonic() - started


def measure(
    conns: int = 2,
    requests: int = 5000,
    reply_size: int = REPLY_SIZE,
    settle: float = 10.0,
    core: int | None = harness.SERVER_CORE,
) -> dict[str, float]:
    """Server RSS before and while ``conns`` never-reading clients pipeline ``requests`` each."""
    with ServerProcess(reply_size, core) as server:
        warm_up(server.port, reply_size)
        time.sleep(0.2)
        baseline = harness.rss_kib(server.pid)
        socks = []
        try:
            for _ in range(conns):
                sock = socket.create_connection((HOST, server.port), timeout=10)
                socks.append(sock)
                # Tiny requests fit in the kernel's buffers: this never blocks.
                sock.sendall(REQUEST * requests)
            loaded, took = settled_rss(server.pid, settle)
        finally:
            for sock in socks:
                sock.close()
    return {
        "connections": conns,
        "requests_per_connection": requests,
        "reply_bytes": reply_size,
        "baseline_kib": baseline,
        "loaded_kib": loaded,
        "settle_s": took,
        "bytes_per_connection": (loaded - baseline) * 1024 / conns,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run the server (used by the driver)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--conns", type=int, default=2)
    parser.add_argument("--requests", type=int, default=5000, help="requests per connection")
    parser.add_argument("--reply-size", type=int, default=REPLY_SIZE)
    parser.add_argument("--settle", type=float, default=10.0, help="longest wait for RSS to settle")
    args = parser.parse_args(argv)
    if args.serve:
        import trio

        harness.pin_to_core(args.core)
        trio.run(serve, args.port, args.reply_size)
        return
    result = measure(args.conns, args.requests, args.reply_size, args.settle)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
