"""Soak test: mixed load with random faults for a given number of minutes.

Run it as ``python -m tests.reliability.soak --minutes 2`` (or
``python tests/reliability/soak.py --minutes 2``, or ``nox -s soak -- --minutes 2``).

One process runs a triocomm service and a triocomm client against it:

* healthy workers send requests (plain ``request``, pipelined ``run``
  sessions, borrowed ``connection`` sessions, some cancelled at a random
  moment, some with ``keepalive=0`` so connections churn) and check that
  every reply is the request's own;
* server-side injectors point fault clients at the service (resets, stalls,
  half-closes, slow readers and writers, garbage, oversized frames);
* a client-side injector points the same client at a fault server that
  misbehaves in the same ways, on a second target.

At the end it prints the figures: requests, faults injected, lost replies
(a healthy request that failed), desynced replies (a reply that was not the
request's own), leaked fds and tasks, pool violations and peak RSS. The exit
status is 0 only if lost, desynced, leaked and violations are all 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import random
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

import triocomm
from triocomm import CommError, Connection, ServerTimeouts, Target, Timeouts
from triocomm.testing import Fault, fault_client, fault_server, open_fd_count, task_count

CODEC = triocomm.LengthPrefixed(max_frame=64 * 1024)
WORKERS = 16
SERVER_INJECTORS = 2
# Bounds every wait on the healthy path: a reply that never comes is lost,
# and is counted, rather than hanging the run.
HEALTHY = Timeouts(connect=5, first_response=5, inactivity=5, keepalive=4, pool=5)
# The faulty target fails fast.
FAULTY = Timeouts(connect=0.5, first_response=0.3, receive=0.5, inactivity=0.3, keepalive=1)
SERVICE = ServerTimeouts(first_request=1, receive=1, inactivity=1, keepalive=5, handshake=1)


@dataclass
class Figures:
    """What a soak run measured."""

    minutes: float = 0.0
    requests: int = 0
    replies: int = 0
    cancelled: int = 0
    in_flight: int = 0
    lost: int = 0
    desynced: int = 0
    faults_injected: int = 0
    faulty_sessions: int = 0
    leaked_fds: int = 0
    leaked_tasks: int = 0
    pool_violations: int = 0
    peak_rss_mib: float = 0.0
    service_errors: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.desynced or self.leaked_fds or self.leaked_tasks
            or self.pool_violations
        )  # fmt: skip

    def note(self, what: str) -> None:
        # Keep a few examples of what went wrong, for the report.
        if len(self.examples) < 10:
            self.examples.append(what)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    if request.endswith(b"!slow"):
        await trio.sleep(0.01)
    return request


# -- the healthy path ------------------------------------------------------------


async def pipelined(conn: Connection[bytes, bytes], messages: list[bytes]) -> list[bytes]:
    await conn.send_many(messages)
    return [await conn.receive() for _ in messages]


async def borrowed(client: Any, target: Target[bytes, bytes], messages: list[bytes]) -> list[bytes]:
    replies = []
    async with client.connection(target) as conn:
        for message in messages:
            await conn.send(message)
            replies.append(await conn.receive())
    return replies


async def healthy_worker(
    client: Any, target: Target[bytes, bytes], figures: Figures, rng: random.Random, worker: int
) -> None:
    for n in range(sys.maxsize):
        base = b"w%d-%d" % (worker, n)
        if rng.random() < 0.05:
            base += b"!slow"
        roll = rng.random()
        messages = [base] if roll < 0.7 else [base + b"/%d" % i for i in range(rng.randint(2, 6))]
        figures.requests += len(messages)
        figures.in_flight += len(messages)
        cancel_after = rng.uniform(0, 0.003) if rng.random() < 0.1 else None
        try:
            with trio.CancelScope() as scope:
                if cancel_after is not None:
                    scope.deadline = trio.current_time() + cancel_after
                if roll < 0.6:
                    replies = [await client.request(target, base)]
                elif roll < 0.7:
                    once = HEALTHY.replace(keepalive=0)  # a connection of its own: churn
                    replies = [await client.request(target, base, timeouts=once)]
                elif roll < 0.9:
                    replies = await client.run(target, pipelined, messages)
                else:
                    replies = await borrowed(client, target, messages)
        except CommError as exc:
            figures.in_flight -= len(messages)
            figures.lost += len(messages)
            figures.note(f"healthy {base!r}: {exc!r}")
            continue
        figures.in_flight -= len(messages)
        if scope.cancelled_caught:
            figures.cancelled += len(messages)
            continue
        figures.replies += len(replies)
        if replies != messages:
            figures.desynced += sum(a != b for a, b in zip(replies, messages, strict=False)) or 1
            figures.note(f"desync: sent {messages!r}, got {replies!r}")


# -- faults ----------------------------------------------------------------------

FaultMaker = Callable[[random.Random], Fault]

# Faults a peer may inflict; the "after" offsets land before, inside and
# after the first 9-byte message.
FAULTS: list[FaultMaker] = [
    lambda rng: Fault.reset(after=rng.randrange(0, 20)),
    lambda rng: Fault.half_close(after=rng.randrange(0, 20)),
    lambda rng: Fault.stall(after=rng.randrange(0, 20)),
    lambda rng: Fault.slow_writer(0.01, after=rng.randrange(0, 12)),
    lambda rng: Fault.slow_reader(0.01),
    lambda rng: Fault.delay(rng.uniform(0, 0.2)),
    lambda rng: Fault.oversized(after=rng.choice([0, 9])),
    # Invalid for the codec (a header far above max_frame), so it cannot be
    # mistaken for a reply: a reply forged by the peer is not a desync.
    lambda rng: Fault.garbage(
        b"\xff\xff" + rng.randbytes(rng.randrange(2, 64)), after=rng.choice([0, 9])
    ),
]


async def server_fault_injector(port: int, figures: Figures, rng: random.Random) -> None:
    """Misbehaving clients against the service, one burst after another."""
    while True:
        fault = rng.choice(FAULTS)(rng)
        if fault.kind == "garbage" and rng.random() < 0.5:
            fault = Fault.garbage(rng.randbytes(rng.randrange(1, 300)))  # anything at all
        requests = [b"f%d" % i for i in range(rng.randint(0, 3))]
        try:
            async with fault_client(
                fault, port, codec=CODEC, requests=requests, connections=rng.randint(1, 4)
            ) as peer:
                # Mostly brief; sometimes long enough for the service's
                # one-second limits to end the connection.
                await trio.sleep(rng.uniform(0, 0.3) if rng.random() < 0.8 else rng.uniform(1, 1.5))
        except OSError as exc:
            figures.note(f"fault client could not connect: {exc!r}")
            continue
        figures.faults_injected += peer.faults


async def client_fault_injector(
    client: Any, port: int, figures: Figures, rng: random.Random
) -> None:
    """The client against a fault server on a second target."""
    target = Target("127.0.0.1", port, CODEC, timeouts=FAULTY)
    for n in range(sys.maxsize):
        fault = rng.choice(FAULTS)(rng)
        messages = [b"c%d-%d" % (n, i) for i in range(rng.randint(1, 3))]
        if fault.kind in ("garbage", "oversized") and fault.after:
            # Bytes written from inside a reply would complete it with forged
            # content, a reply no codec can tell from a real one. Strike at a
            # frame boundary instead: after the first reply, as stray bytes.
            fault = dataclasses.replace(fault, after=len(CODEC.encode(messages[0])))
        async with fault_server(fault, codec=CODEC, port=port) as peer:
            for message in messages:
                figures.faulty_sessions += 1
                try:
                    reply = await client.request(target, message)
                except CommError:
                    continue
                if reply != message:
                    figures.desynced += 1
                    figures.note(f"desync from faulty target: sent {message!r}, got {reply!r}")
        figures.faults_injected += peer.faults


def pool_violations(client: Any, target: Target[bytes, bytes], figures: Figures) -> None:
    stats = client.stats(target)
    if stats.open != stats.idle + stats.in_use or stats.open != stats.created - stats.closed:
        figures.pool_violations += 1
        figures.note(f"pool of {target}: {stats}")


async def reporter(
    figures: Figures, started: float, every: float, client: Any, targets: list[Target[bytes, bytes]]
) -> None:
    while True:
        await trio.sleep(every)
        # These hold at every moment, not only when the load stops.
        for target in targets:
            pool_violations(client, target, figures)
        elapsed = trio.current_time() - started
        print(
            f"[{elapsed:6.0f} s] requests {figures.requests:,}  faults {figures.faults_injected:,}"
            f"  lost {figures.lost}  desynced {figures.desynced}  fds {open_fd_count()}"
            f"  rss {peak_rss_mib():.0f} MiB",
            flush=True,
        )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def soak(minutes: float, seed: int, report_every: float = 10.0) -> Figures:
    """Run the mixed load with faults for ``minutes``; return the figures."""
    figures = Figures(minutes=minutes)
    rng = random.Random(seed)
    fds_before = open_fd_count()
    tasks_before = task_count()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                triocomm.serve, echo, 0, host="127.0.0.1", codec=CODEC, timeouts=SERVICE
            )
        )
        target = Target("127.0.0.1", server.port, CODEC)
        faulty_port = free_port()
        async with triocomm.open_client(timeouts=HEALTHY) as client:
            started = trio.current_time()
            async with trio.open_nursery() as load:
                for worker in range(WORKERS):
                    load.start_soon(
                        healthy_worker, client, target, figures, random.Random(rng.random()), worker
                    )
                for _ in range(SERVER_INJECTORS):
                    load.start_soon(
                        server_fault_injector, server.port, figures, random.Random(rng.random())
                    )
                load.start_soon(
                    client_fault_injector, client, faulty_port, figures, random.Random(rng.random())
                )
                targets = [target, Target("127.0.0.1", faulty_port, CODEC, timeouts=FAULTY)]
                load.start_soon(reporter, figures, started, report_every, client, targets)
                await trio.sleep(minutes * 60)
                load.cancel_scope.cancel()
            # Nothing runs now: every slot must be back.
            for each in targets:
                pool_violations(client, each, figures)
                stats = client.stats(each)
                if stats.in_use or stats.connecting or stats.waiting:
                    figures.pool_violations += 1
                    figures.note(f"slots not returned to the pool of {each}: {stats}")
        await server.shutdown(grace=5)
        # Sessions still running when the load stopped were cancelled with
        # it; anything else that has no outcome vanished.
        vanished = (
            figures.requests - figures.replies - figures.cancelled - figures.lost
            - figures.in_flight
        )  # fmt: skip
        if vanished:
            figures.lost += vanished
            figures.note(f"{vanished} requests ended with no reply, error or cancellation")
        figures.service_errors = {k: v for k, v in server.stats.errors.items() if v}
    # Closing is complete once the nurseries have exited.
    figures.leaked_fds = open_fd_count() - fds_before
    figures.leaked_tasks = task_count() - tasks_before
    figures.peak_rss_mib = round(peak_rss_mib(), 1)
    return figures


def summary(figures: Figures) -> str:
    lines = [
        f"soak: {figures.minutes:g} min",
        f"  requests          {figures.requests:,} ({figures.replies:,} replies, "
        f"{figures.cancelled:,} cancelled on purpose, {figures.in_flight} in flight at the end)",
        f"  faults injected   {figures.faults_injected:,} "
        f"({figures.faulty_sessions:,} sessions against the faulty target)",
        f"  lost replies      {figures.lost}",
        f"  desynced replies  {figures.desynced}",
        f"  leaked fds        {figures.leaked_fds}",
        f"  leaked tasks      {figures.leaked_tasks}",
        f"  pool violations   {figures.pool_violations}",
        f"  peak RSS          {figures.peak_rss_mib:.1f} MiB",
        f"  service errors    {figures.service_errors}",
        f"  result            {'PASS' if figures.ok else 'FAIL'}",
    ]
    lines += [f"  example: {example}" for example in figures.examples]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument(
        "--report-every", type=float, default=10.0, metavar="S", help="progress line period"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the service's log lines")
    args = parser.parse_args(argv)
    # Injected faults make the service log a line each; only show them on request.
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL)
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"soak: {args.minutes:g} min, seed {seed}", flush=True)
    figures = trio.run(soak, args.minutes, seed, args.report_every)
    print(summary(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": seed, **dataclasses.asdict(figures)}, f, indent=2)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
