"""The load generator of ``bench``: distinct request payloads, the sessions
that send them and check every echo, the workers, and ``LoadRun``, the
bookkeeping one run shares between its workers.

A worker repeats one batch (one request, or D pipelined requests) until the
run's budget or time is used up. Every request it claims ends as a checked
reply or as an error by kind; a connect that fails is counted apart from
both (``connect_errors``), since no request was sent on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from .. import Client, CommError, CommTimeout, ConnectError, Connection, Target, Timeouts
from ._failure import cause
from ._histogram import LatencyHistogram

# A worker whose connect failed waits this long before trying again, so an
# unreachable peer is not hammered in a tight loop.
CONNECT_BACKOFF = 0.1


class EchoMismatch(CommError):
    """An echoed reply differs from the request that was sent."""


def error_kind(exc: BaseException) -> str:
    """How ``bench`` files a failed request in its errors-by-kind table."""
    if isinstance(exc, CommTimeout):
        return f"timeout ({exc.phase})"
    if isinstance(exc, trio.EndOfChannel):
        return "closed by peer"
    return type(exc).__name__


def payload_maker(size: int) -> Callable[[int, int], bytes]:
    """Return ``make(worker, serial)``: a distinct request of ``size`` bytes.

    Each request starts with its worker and serial number, so a reply that
    answers the wrong request (a desynchronised connection) is caught, not
    just a corrupted one. The bytes are letters, digits, ``.`` and ``:``:
    never a newline, so the same payloads work for the ``lines`` codec.
    """
    letters = b"abcdefghijklmnopqrstuvwxyz"
    filler = (letters * (size // len(letters) + 1))[:size]

    def make(worker: int, serial: int) -> bytes:
        tag = b"%d.%d:" % (worker, serial)
        return tag[:size] + filler[len(tag) :]

    return make


class LoadRun:
    """The shared state of one ``bench`` run: the request budget and what was measured.

    Workers ``claim`` requests before sending them, so ``--requests N`` sends
    exactly N; ``stop`` ends the claiming, after which requests already in
    flight may finish. Every request ends either in ``done`` (with its
    latency recorded) or in ``errors``; a failed connect is counted in
    ``connect_errors`` instead, and the requests it was to carry still
    count toward the budget, so a run against a service that went away ends.
    """

    def __init__(self, requests: int | None, clock: Callable[[], float] = trio.current_time):
        self.remaining = requests
        self.stopping = False
        self.stopped = trio.Event()
        self.interrupted = False
        self.done = 0
        self.errors: Counter[str] = Counter()
        #: Failed connects, by their cause ("Connection refused").
        self.connect_errors: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self.clock = clock
        self.started_at = clock()
        self.finished_at: float | None = None
        self.last_answered_at = self.started_at
        self.last_connect_error_at: float | None = None

    def claim(self, depth: int) -> int:
        """Take up to ``depth`` requests from the budget (0: the run is over)."""
        if self.stopping:
            return 0
        if self.remaining is None:
            return depth
        count = min(depth, self.remaining)
        self.remaining -= count
        return count

    def stop(self, *, interrupted: bool = False) -> None:
        """End the claiming: requests in flight may finish, no new one starts."""
        self.stopping = True
        self.interrupted = self.interrupted or interrupted
        self.stopped.set()

    def finish(self) -> None:
        """Note that the last worker has ended: the end of ``elapsed``."""
        self.finished_at = self.clock()

    def answered(self, sent_at: float) -> None:
        """Count one checked reply to a request sent at ``sent_at``."""
        now = self.clock()
        self.latency.record((now - sent_at) * 1e6)
        self.done += 1
        self.last_answered_at = now

    def failed(self, exc: BaseException, count: int) -> None:
        """Count ``count`` requests lost to ``exc`` (a failed connect is counted apart)."""
        if isinstance(exc, ConnectError):
            self.connect_errors[cause(exc)] += 1
            self.last_connect_error_at = self.clock()
        else:
            self.errors[error_kind(exc)] += count

    def abandoned(self, count: int) -> None:
        """Count ``count`` requests still unanswered when the end grace ran out."""
        self.errors["unanswered at the end"] += count

    @property
    def error_count(self) -> int:
        """Failed requests so far."""
        return sum(self.errors.values())

    @property
    def connect_error_count(self) -> int:
        """Failed connects so far."""
        return sum(self.connect_errors.values())

    @property
    def elapsed(self) -> float:
        """From the start to the moment the last worker ended (or to now, while running)."""
        end = self.finished_at if self.finished_at is not None else self.clock()
        return end - self.started_at

    @property
    def measured(self) -> float:
        """The time requests/s is taken over: ``elapsed``, except when the
        service stopped answering and connects failed after its last reply.
        Then the run ends, for the rate, at that last reply: time spent
        failing to connect to a service that has gone away says nothing of
        how fast it answered."""
        failed_at = self.last_connect_error_at
        if failed_at is not None and failed_at > self.last_answered_at:
            return min(self.last_answered_at - self.started_at, self.elapsed)
        return self.elapsed


Session = Callable[[list[bytes], Callable[[float], None]], Any]


def _check(reply: bytes, request: bytes) -> None:
    if reply != request:
        raise EchoMismatch(
            f"reply of {len(reply)} bytes does not echo the {len(request)}-byte request "
            f"(starts {reply[:16]!r}, expected {request[:16]!r})"
        )


def make_session(
    client: Client,
    target: Target[bytes, bytes],
    *,
    framed: bool,
    depth: int,
    timeouts: Timeouts | None = None,
) -> Session:
    """Return ``session(payloads, answered)``: send the payloads, check every echo.

    One request without pipelining is one ``client.request`` (the API most
    programs use). A pipelined batch is one ``client.run`` session: the D
    requests go out in one write, then D replies are read. The raw codec has
    no message boundaries, so its replies are reassembled and compared byte
    for byte. ``answered(sent_at)`` is called for each checked reply.
    """
    clock = trio.current_time

    async def one_request(payloads: list[bytes], answered: Callable[[float], None]) -> None:
        sent_at = clock()
        reply = await client.request(target, payloads[0], timeouts=timeouts)
        _check(reply, payloads[0])
        answered(sent_at)

    async def pipelined(
        conn: Connection[bytes, bytes], payloads: list[bytes], answered: Callable[[float], None]
    ) -> None:
        sent_at = clock()
        await conn.send_many(payloads)
        for payload in payloads:
            _check(await conn.receive(), payload)
            answered(sent_at)

    async def raw(
        conn: Connection[bytes, bytes], payloads: list[bytes], answered: Callable[[float], None]
    ) -> None:
        sent_at = clock()
        await conn.send_many(payloads)
        expected = b"".join(payloads)
        size = len(payloads[0])
        received = 0
        while received < len(expected):
            chunk = await conn.receive()
            end = received + len(chunk)
            if chunk != expected[received:end]:
                raise EchoMismatch(f"bytes {received}-{end} of the echo differ from what was sent")
            # Every request whose last byte has now arrived is answered.
            for _ in range(received // size, end // size):
                answered(sent_at)
            received = end

    async def batch(payloads: list[bytes], answered: Callable[[float], None]) -> None:
        # A retry (a stale pooled connection) only happens before any reply
        # byte, so no request is counted twice.
        body = pipelined if framed else raw
        await client.run(target, body, payloads, answered, timeouts=timeouts)

    return one_request if framed and depth == 1 else batch


async def worker(index: int, run: LoadRun, session: Session, depth: int, size: int) -> None:
    """Send batches of ``depth`` requests through ``session`` until the run is over."""
    make = payload_maker(size)
    serial = 0
    answered_here = 0

    def answered(sent_at: float) -> None:
        nonlocal answered_here
        answered_here += 1
        run.answered(sent_at)

    while count := run.claim(depth):
        payloads = [make(index, serial + k) for k in range(count)]
        serial += count
        answered_here = 0
        try:
            await session(payloads, answered)
        except trio.Cancelled:
            # Abandoned when the run's end grace ran out: still unanswered.
            run.abandoned(count - answered_here)
            raise
        except Exception as exc:
            # The requests of this batch that got no checked reply failed.
            run.failed(exc, count - answered_here)
            if isinstance(exc, ConnectError):
                await trio.sleep(CONNECT_BACKOFF)
