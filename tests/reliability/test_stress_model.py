"""Randomised schedules against one connection: whole messages, or a closed connection.

Hypothesis generates a schedule; each example runs it in a fresh Trio run on
real loopback TCP or TLS, with a ``MockClock`` that jumps as soon as every
task waits and the kernel owes nothing between the two ends (so limits
expire in mock time, at once, but never while bytes are on their way):

* the service (``serve_connections``) runs writer tasks that ``send``,
  ``send_many`` and ``send_file`` messages of mixed sizes (up to 400 KB,
  through a peer window of a few KB, so writes go out in parts), a reader
  that receives (and may echo) the peer's messages, and ``on_idle``
  heartbeats; any of those calls may have its cancel scope cancelled after
  a generated number of scheduler rounds;
* the peer (:class:`peer.RawPeer`, not triocomm) sends messages, reads in
  generated amounts, sleeps past limits, and *races*: it puts a message on
  the wire and jumps the clock to the next deadline in the same step, so the
  message's arrival and an expiry land in one scheduler round;
* at the end the peer sends a last message, reads to the end of the stream,
  and everything is checked: the bytes it got are whole messages that were
  sent, in each sender's order, then at most one cut message, then the end
  (``wire.problems``); every send that returned was delivered unless the
  connection failed; every send that raised left it closed; the service
  received the peer's messages in order, all of them unless it failed.

Examples are derandomised and there is no example database, so every run
checks the same schedules; the number of examples keeps the suite short.
"""

from __future__ import annotations

import functools
import io
import math
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from peer import RawPeer, in_flight
from wire import CODEC, SendLog, Wire, describe, frame, problems

import triocomm

EXAMPLES = 300
SIZES = st.sampled_from([16, 300, 5_000, 70_000, 400_000])
# Scheduler rounds before a call's cancel scope is cancelled (None: never).
CANCEL = st.none() | st.integers(0, 30)
# Errors a send or receive may raise on a connection that failed or closed.
ENDED = (triocomm.CommError, trio.BrokenResourceError, trio.ClosedResourceError)
END = b"<end:0>"
# Longer than any limit a schedule sets; far shorter than an example's bound.
LONGEST_LIMIT = 200.0
EXAMPLE_BOUND = 10_000
BEATS = 3
# How long (real seconds, in polls) the clock waits for the kernel to deliver
# what it owes before jumping anyway; a zero-window probe takes ~0.2 s.
KERNEL_POLL = 0.002
KERNEL_POLLS = 2_500


@dataclass(frozen=True)
class Schedule:
    """What the service's tasks and the peer do in one example."""

    writers: list[list[tuple[Any, ...]]]
    receive_cancels: list[int | None]
    echo: bool
    peer_steps: list[tuple[Any, ...]]
    keepalive: float
    inactivity: float | None
    send_limit: float | None
    idle: float | None
    beat_size: int


OPS = st.one_of(
    st.tuples(st.just("send"), SIZES, CANCEL),
    st.tuples(st.just("send_many"), st.lists(SIZES, min_size=1, max_size=4), CANCEL),
    st.tuples(st.just("send_file"), st.lists(SIZES, min_size=1, max_size=3), CANCEL),
    st.tuples(st.just("pause"), st.sampled_from([0.5, 2.0, 6.0]), st.none()),
)
PEER_STEPS = st.one_of(
    st.tuples(st.just("send"), st.integers(1, 3000)),
    st.tuples(st.just("race"), st.integers(1, 3000), st.sampled_from([0.0, 0.0, 0.5])),
    st.tuples(st.just("read"), st.sampled_from([1_000, 20_000, 300_000, 10**9])),
    st.tuples(st.just("sleep"), st.sampled_from([0.5, 1.5, 4.0, 12.0])),
)
SCHEDULES = st.builds(
    Schedule,
    writers=st.lists(st.lists(OPS, max_size=5), max_size=3),
    receive_cancels=st.lists(CANCEL, max_size=6),
    echo=st.booleans(),
    peer_steps=st.lists(PEER_STEPS, max_size=10),
    keepalive=st.sampled_from([3.0, 8.0, 100.0]),
    inactivity=st.sampled_from([None, 2.0, 5.0]),
    send_limit=st.sampled_from([None, 4.0]),
    idle=st.sampled_from([None, 1.0, 3.0]),
    beat_size=SIZES,
)


@dataclass
class Run:
    """One example's record: what was sent each way, and what went wrong."""

    schedule: Schedule
    files: str
    tls: bool
    log: SendLog = field(default_factory=SendLog)
    conn: triocomm.Connection[Any, Any] | None = None
    peer: RawPeer | None = None
    peer_sent: list[bytes] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    beats: int = 0
    tasks: trio.Nursery | None = None
    started: trio.Event = field(default_factory=trio.Event)


async def cancellable(
    run: Run, rounds: int | None, fn: Callable[..., Awaitable[Any]], *args: Any
) -> Any:
    """``(await fn(*args),)``, its cancel scope cancelled after ``rounds`` rounds; None if it was.

    The canceller runs in the handler's nursery, not a nursery of its own, so
    that the call's exceptions reach the caller as themselves.
    """
    if rounds is None:
        return (await fn(*args),)
    scope = trio.CancelScope()

    async def cancel() -> None:
        for _ in range(rounds):
            await trio.lowlevel.checkpoint()
        scope.cancel()  # a no-op once the call has left the scope

    assert run.tasks is not None
    run.tasks.start_soon(cancel)
    with scope:
        return (await fn(*args),)
    return None


def file_of(run: Run, writer: int, op: int, sizes: list[int]) -> tuple[Any, int, list[bytes]]:
    """A file for one send_file: a junk lead, then the frames, so the offset matters.

    Over TCP a path (sent with ``os.sendfile``); over TLS an in-memory file,
    read without a worker thread: while a thread works every task waits, and
    the mock clock would jump past every limit, the example's bound included.
    """
    payloads = [run.log.payload(f"f{writer}", size) for size in sizes]
    lead = b"junk" * (op + 1)
    content = lead + b"".join(frame(p) for p in payloads)
    if run.tls:
        return io.BytesIO(content), len(lead), payloads
    path = os.path.join(run.files, f"w{writer}-{op}")
    with open(path, "wb") as f:
        f.write(content)
    return path, len(lead), payloads


async def write(run: Run, conn: triocomm.Connection[Any, Any], writer: int) -> None:
    """One writer task: its ops in order, stopping at the first that fails."""
    log = run.log
    label = f"w{writer}"
    for number, (kind, arg, rounds) in enumerate(run.schedule.writers[writer]):
        try:
            if kind == "pause":
                await trio.sleep(arg)
            elif kind == "send":
                await cancellable(run, rounds, log.send, conn, log.payload(label, arg))
            elif kind == "send_many":
                payloads = [log.payload(label, size) for size in arg]
                await cancellable(run, rounds, log.send_many, conn, payloads)
            else:
                path, offset, payloads = file_of(run, writer, number, arg)
                await cancellable(run, rounds, log.send_file, conn, path, offset, payloads)
        except ENDED:
            return
        except Exception as exc:
            run.unexpected.append(f"writer {writer}, op {number} ({kind}) raised {exc!r}")
            return


async def read(run: Run, conn: triocomm.Connection[Any, Any]) -> None:
    """The reader: receive (each call maybe cancelled) until the peer's last message."""
    cancels = run.schedule.receive_cancels
    for number in range(10_000):
        rounds = cancels[number] if number < len(cancels) else None
        try:
            got = await cancellable(run, rounds, conn.receive)
        except (trio.EndOfChannel, *ENDED):
            return
        if got is None:
            continue  # cancelled: receiving again must lose nothing
        message = got[0]
        run.received.append(message)
        if message == END:
            return
        if run.schedule.echo:
            try:
                await run.log.send(conn, run.log.payload("echo", min(len(message), 2000)))
            except ENDED:
                return
    run.unexpected.append("the reader never saw the last message")


def service(run: Run) -> tuple[Any, Any]:
    """The service's connection handler and heartbeat for ``run``."""

    async def handler(conn: triocomm.Connection[Any, Any]) -> None:
        run.conn = conn
        run.started.set()
        async with trio.open_nursery() as tasks:
            run.tasks = tasks
            for writer in range(len(run.schedule.writers)):
                tasks.start_soon(write, run, conn, writer)
            await read(run, conn)

    async def heartbeat(conn: triocomm.Connection[Any, Any], status: triocomm.Idle) -> None:
        if run.beats >= BEATS:
            return
        run.beats += 1
        await run.log.send(conn, run.log.payload("beat", run.schedule.beat_size))

    return handler, heartbeat


async def play(run: Run, peer: RawPeer, clock: trio.testing.MockClock) -> Wire:
    """The peer's side: its steps, then the last message and a read to the end."""
    got = bytearray()
    budget = 0
    granted = trio.Event()
    ended: list[str] = []

    async def reader() -> None:
        nonlocal budget, granted
        while True:
            while budget <= 0:
                await granted.wait()
                granted = trio.Event()
            try:
                data = await peer.recv(min(budget, 256 * 1024))
            except (ConnectionResetError, BrokenPipeError):
                ended.append("reset")
                return
            if not data:
                ended.append("eof")
                return
            got.extend(data)
            budget -= len(data)

    def grant(amount: int) -> None:
        nonlocal budget
        budget += amount
        granted.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        for step in run.schedule.peer_steps:
            await peer_step(run, peer, clock, step, grant)
        await send_message(run, peer, END)
        grant(1 << 62)
    return Wire(bytes(got), ended[0])


async def peer_step(
    run: Run,
    peer: RawPeer,
    clock: trio.testing.MockClock,
    step: tuple[Any, ...],
    grant: Callable[[int], None],
) -> None:
    kind = step[0]
    if kind == "send":
        await send_message(run, peer, run.log.payload("peer", step[1]))
    elif kind == "race":
        payload = run.log.payload("peer", step[1])
        run.peer_sent.append(payload)
        try:
            whole = peer.send_now(frame(payload))
        except (ConnectionResetError, BrokenPipeError):
            return
        # No schedule point between the send and the jump: the message and
        # the next deadline's expiry are seen in the same scheduler round.
        to_next = trio.lowlevel.current_statistics().seconds_to_next_deadline
        if to_next < LONGEST_LIMIT:  # not the example's own time bound
            clock.jump(max(to_next, 0.0) + step[2])
        if not whole:
            await send_message(run, peer, b"")
        await trio.lowlevel.checkpoint()
    elif kind == "read":
        grant(step[1])
        await trio.lowlevel.checkpoint()
    else:
        await trio.sleep(step[1])


async def send_message(run: Run, peer: RawPeer, payload: bytes) -> None:
    """Send one of the peer's messages (b"": only the rest of an earlier one); ignore a reset."""
    data = b""
    if payload:
        run.peer_sent.append(payload)
        data = frame(payload)
    try:
        await peer.send(data)
    except (ConnectionResetError, BrokenPipeError):
        pass


def service_socket(run: Run) -> Any:
    """The service's end of the connection; None until the handler has it."""
    if run.conn is None:
        return None
    stream: Any = run.conn.stream
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket


async def advance(run: Run, clock: trio.testing.MockClock) -> None:
    """Jump the clock to the next deadline whenever every task waits on it alone.

    A ``MockClock`` autojump fires as soon as every task waits, even when they
    wait on the kernel: loopback bytes are delivered in real time, and a
    window update after the peer drains a small window can take a
    zero-window probe (~0.2 s) to arrive. Jumping then expires a limit the
    schedule never reached, or the example's bound. So this jumps only when
    the kernel owes nothing between the two ends (:func:`peer.in_flight`);
    before the handler has the connection (the TLS handshake), every wait
    is on the kernel. Waits for the kernel are bounded: a transfer still
    owed after ``KERNEL_POLLS`` polls is a hang, and the jump reports it.
    """
    while True:
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(KERNEL_POLLS):
            service_end = service_socket(run)
            if (
                run.peer is not None
                and service_end is not None
                and not in_flight(run.peer.sock, service_end)
            ):
                break
            await trio.testing.wait_all_tasks_blocked(KERNEL_POLL)
        to_next = trio.lowlevel.current_statistics().seconds_to_next_deadline
        assert to_next < math.inf, "every task waits, with no deadline set"
        if to_next > 0:
            clock.jump(to_next)


async def scenario(run: Run, ssl_context: ssl.SSLContext | None, client_context: Any) -> Wire:
    """Serve one connection under ``run.schedule``; return what the peer got."""
    schedule = run.schedule
    handler, heartbeat = service(run)
    timeouts = triocomm.ServerTimeouts(
        first_request=schedule.keepalive,
        keepalive=schedule.keepalive,
        inactivity=schedule.inactivity,
        send=schedule.send_limit,
    )
    idle = None if schedule.idle is None else {triocomm.Idle.READ: schedule.idle}
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock)
    async with trio.open_nursery() as nursery:
        server: triocomm.Server = await nursery.start(
            functools.partial(
                triocomm.serve_connections,
                handler,
                0,
                host="127.0.0.1",
                codec=CODEC,
                ssl_context=ssl_context,
                timeouts=timeouts,
                idle=idle,
                on_idle=heartbeat if idle else None,
            )
        )
        # Mock time: a hang becomes a jump to this deadline, and a failure.
        with trio.fail_after(EXAMPLE_BOUND):
            nursery.start_soon(advance, run, clock)
            run.peer = peer = await RawPeer.connect(server.port, client_context)
            try:
                # The service's side of a TLS handshake may still be going on.
                await run.started.wait()
                wire = await play(run, peer, clock)
            finally:
                peer.close()
            while server.stats.connections_open:
                await trio.sleep(1)
        if server.stats.errors["handler"]:
            run.unexpected.append(f"the handler failed: {dict(server.stats.errors)}")
        nursery.cancel_scope.cancel()
    return wire


def verdict(run: Run, wire: Wire) -> list[str]:
    """Everything wrong with one example (empty when nothing is)."""
    conn = run.conn
    if conn is None:
        return ["the handler never ran"]
    failed = conn.state is triocomm.ConnState.ERROR
    found = problems(wire, run.log, failed=failed) + run.unexpected
    if run.received != run.peer_sent[: len(run.received)]:
        found.append("the service received the peer's messages out of order, or changed")
    elif not failed and run.received != run.peer_sent:
        found.append(
            f"the service received {len(run.received)} of the peer's {len(run.peer_sent)} "
            f"messages on a connection that did not fail ({conn.state})"
        )
    if not failed and wire.end != "eof":
        found.append(f"a connection closed without failing ended in a {wire.end}")
    return found


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(schedule=SCHEDULES)
def test_a_random_schedule_keeps_the_stream_whole(
    transport: str,
    schedule: Schedule,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
) -> None:
    tls = transport == "tls"
    with tempfile.TemporaryDirectory(prefix="tc-stress-") as files:
        run = Run(schedule, files, tls)
        wire = trio.run(
            scenario,
            run,
            server_ssl_context if tls else None,
            client_ssl_context if tls else None,
            clock=trio.testing.MockClock(),  # moved by advance()
        )
    found = verdict(run, wire)
    assert not found, "; ".join(found) + f" [{describe(wire, run.log)}]"
