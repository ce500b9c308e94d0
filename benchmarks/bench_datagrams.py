"""Datagram echo: ``serve_datagrams`` against a raw-Trio UDP loop and asyncio.

``python benchmarks/bench_datagrams.py [--reps 3] [--duration 3] [--quick] [--json FILE]``

Three UDP echo servers, each in its own process on core 0: triocomm's
``serve_datagrams`` (codec ``Raw``), the plainest Trio loop (``recvfrom``
then ``sendto``, one datagram at a time), and an asyncio
``DatagramProtocol`` (on uvloop when it is installed). One load generator
(asyncio, uvloop when present, core 1) keeps ``--conns`` sockets in
ping-pong: each sends a 64-byte datagram, waits for the echo, checks it and
sends the next; a datagram not answered within a second is sent again
(counted as ``resent``). The table gives requests per second (median of the
reps, measured in rotating order) and each server's ratio to raw Trio, the
figure the goal (>= 1.0x) is stated in. Importable as
``run(quick: bool) -> dict``; nothing is asserted here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import harness

HERE = Path(__file__).resolve().parent
KINDS = ("triocomm", "raw-trio", "asyncio-protocol")
SIZE = 64
RESEND_AFTER = 1.0


# -- the servers (run with --serve KIND) ----------------------------------------


def serve_triocomm() -> None:
    import functools

    import trio

    import triocomm

    async def echo(request: bytes, peer: Any) -> bytes:
        return request

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    triocomm.serve_datagrams, echo, 0, host="127.0.0.1", codec=triocomm.Raw()
                )
            )
            print(f"PORT {server.port}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the driver closes stdin
            nursery.cancel_scope.cancel()

    trio.run(main)


def serve_raw_trio() -> None:
    import trio

    async def loop(sock: Any) -> None:
        while True:
            data, address = await sock.recvfrom(65536)
            await sock.sendto(data, address)

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(loop, sock)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()
        sock.close()

    trio.run(main)


class _EchoProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(data, addr)


def serve_asyncio() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            _EchoProtocol, local_addr=("127.0.0.1", 0)
        )
        print(f"PORT {transport.get_extra_info('sockname')[1]}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        transport.close()

    _run_asyncio(main())


def _run_asyncio(main: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


# -- the load generator (run with --load PORT) -----------------------------------


class _PingPong(asyncio.DatagramProtocol):
    """One socket in ping-pong: the next datagram goes out when the echo came back."""

    def __init__(self, index: int, counts: dict[str, int]) -> None:
        self.counts = counts
        self.prefix = index.to_bytes(4, "big")
        self.sequence = 0
        self.sent_at = 0.0
        self.running = True
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not derive from asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.send()

    def payload(self) -> bytes:
        return (self.prefix + self.sequence.to_bytes(8, "big")).ljust(SIZE, b"x")

    def send(self) -> None:
        assert self.transport is not None
        self.sent_at = time.monotonic()
        self.transport.sendto(self.payload())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if data != self.payload():
            if data[:4] != self.prefix or len(data) != SIZE:
                self.counts["wrong"] += 1
            return  # a late echo of a datagram sent again
        self.counts["done"] += 1
        self.sequence += 1
        if self.running:
            self.send()

    def resend_if_lost(self, now: float) -> None:
        if self.running and now - self.sent_at > RESEND_AFTER:
            self.counts["resent"] += 1
            self.send()


def load(port: int, conns: int, duration: float) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counts = {"done": 0, "resent": 0, "wrong": 0}
        peers = []
        for i in range(conns):
            _, peer = await loop.create_datagram_endpoint(
                lambda i=i: _PingPong(i, counts), remote_addr=("127.0.0.1", port)
            )
            peers.append(peer)
        await asyncio.sleep(min(0.5, duration / 4))  # warm up
        start_count, start = counts["done"], time.monotonic()
        end = start + duration
        while (now := time.monotonic()) < end:
            for peer in peers:
                peer.resend_if_lost(now)
            await asyncio.sleep(min(0.1, end - now))
        done = counts["done"] - start_count
        elapsed = time.monotonic() - start
        for peer in peers:
            peer.running = False
            assert peer.transport is not None
            peer.transport.close()
        result = {"requests_per_s": done / elapsed, "resent": counts["resent"]}
        result["wrong"] = counts["wrong"]
        print(json.dumps(result))

    _run_asyncio(main())


# -- the driver -------------------------------------------------------------------


def measure(kind: str, conns: int, duration: float) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--core", str(harness.SERVER_CORE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server {kind!r} did not start (said {line!r})")
        port = int(line.split()[1])
        options = ["--conns", str(conns), "--duration", str(duration)]
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--load",
                str(port),
                "--core",
                str(harness.LOAD_CORE),
                *options,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=duration + 60,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        if result["wrong"]:
            raise RuntimeError(f"server {kind!r} echoed {result['wrong']} wrong datagrams")
        return result
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()


def run(
    quick: bool = False, reps: int = 3, duration: float = 3.0, conns: int = 16
) -> dict[str, Any]:
    """Measure every server ``reps`` times (rotating order); return medians and ratios."""
    if quick:
        reps, duration = 1, 0.5
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    resent: dict[str, int] = dict.fromkeys(KINDS, 0)
    for rep in range(reps):
        for kind in KINDS[rep % len(KINDS) :] + KINDS[: rep % len(KINDS)]:
            result = measure(kind, conns, duration)
            samples[kind].append(result["requests_per_s"])
            resent[kind] += result["resent"]
    base = statistics.median(samples["raw-trio"])
    servers = {}
    for kind, values in samples.items():
        median = statistics.median(values)
        servers[kind] = {
            "median": median,
            "min": min(values),
            "max": max(values),
            "ratio_to_raw_trio": median / base,
            "resent": resent[kind],
        }
    return {
        "workload": f"UDP echo, {conns} sockets ping-pong {SIZE} B, {duration:g}s x {reps}",
        "asyncio_loop": "uvloop" if harness_has_uvloop() else "asyncio",
        "servers": servers,
    }


def harness_has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(result: dict[str, Any]) -> str:
    lines = [result["workload"], f"{'server':<18}{'req/s':>12}{'min-max':>24}{'x raw':>8}"]
    for kind, row in result["servers"].items():
        span = f"{row['min']:,.0f}-{row['max']:,.0f}"
        lines.append(
            f"{kind:<18}{row['median']:>12,.0f}{span:>24}{row['ratio_to_raw_trio']:>7.2f}x"
        )
    lines.append(f"(asyncio-protocol runs on {result['asyncio_loop']}; goal: triocomm >= 1.0x)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--load", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.core is not None:
        harness.pin_to_core(args.core)
    if args.serve:
        {"triocomm": serve_triocomm, "raw-trio": serve_raw_trio}.get(args.serve, serve_asyncio)()
        return
    if args.load:
        load(args.load, args.conns, args.duration)
        return
    result = run(args.quick, args.reps, args.duration, args.conns)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
