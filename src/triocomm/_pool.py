"""The keep-alive pool: one small, explicit state machine per target.

A :class:`KeepAlivePool` decides which connection serves which session of one
target, and nothing else: the client (``_client.py``) opens connections and
runs sessions, the pool lends and takes back. Every connection has an entry
that moves through four states::

    CONNECTING ──► IN_USE ◄──► IDLE
        │            │          │
        └────────────┴──────────┴──► CLOSED

``CONNECTING`` holds a slot while the socket, the TLS handshake and the
target's ``on_connect`` run; ``IN_USE`` is lent to one session; ``IDLE`` sits
on a LIFO stack, watched for the keep-alive deadline, the peer closing and
stray bytes (once it has *settled*, see below); ``CLOSED`` is final. All
bookkeeping happens synchronously in the methods below (never after an
``await``), so a cancellation at any checkpoint cannot lose a slot, and the
counters of :class:`PoolStats` hold at every moment.

Each connection lives in a task of the client's nursery
(:meth:`KeepAlivePool.connection_task`) that owns its socket: it connects,
waits while sessions use the connection (sessions run in their caller's task,
so a pooled request costs no hop to another task), watches it while idle, and
closes it.

**Settle before watching.** Lending and taking back never wake that task.
While a connection is lent, or idle for less than ``_SETTLE``, its task
sleeps in a cancel scope whose deadline the pool moves (moving a deadline
costs no system call and no task switch). Only a connection still idle when
that deadline comes registers its socket with the event loop and watches it
under the keep-alive deadline. Under load, where a connection is lent again
within microseconds, a request therefore costs no wake of a second task and
no ``epoll_ctl`` calls; the one check that a stale connection is never lent
is the ``poll(0)`` made when it is lent (:meth:`PooledConnection.peer_spoke`).
"""

from __future__ import annotations

import logging
import math
import select
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ._connection import Connection, ConnState
from ._errors import CommTimeout

__all__ = ["AddressLedger", "KeepAlivePool", "PoolStats"]

logger = logging.getLogger("triocomm.client")

_INF = math.inf
# A graceful close (TLS close_notify) of a connection the pool retires may
# take this long before the socket is closed regardless.
_CLOSE_GRACE = 1.0
# How long a plain-socket connection stays idle before its task starts
# watching the socket. Shorter means a peer's close is noticed (and the socket
# freed) sooner; longer means fewer connections pay the watch's wake and its
# two epoll_ctl calls. Correctness does not depend on it: a connection is
# checked when it is lent either way. A quarter second is far above the gap
# between two requests of a busy client and far below any keep-alive time.
_SETTLE = 0.25


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of one target's keep-alive pool (``client.stats(target)``).

    Gauges (what is true right now):

    Attributes:
        open: connections that are connected: ``idle + in_use``.
        idle: connections waiting in the pool for their next session.
        in_use: connections lent to a session.
        connecting: connections being opened (socket, TLS handshake,
            ``on_connect``); they count toward ``max_connections``.
        waiting: sessions queued for a slot because ``max_connections`` are
            taken.

    Counters (since the client opened):

    Attributes:
        created: connections opened successfully; each served the session it
            was opened for.
        reused: sessions served by a pooled connection.
        closed: opened connections that have been closed since, for any
            reason.
        failed: session attempts that raised (a failed connect, a pool
            timeout, an error, a timeout or a cancellation during the session).
        retries: failed session attempts on this target that were tried
            again (see :class:`RetryPolicy`); the retry may have gone to
            another address of an ``Upstream``.
        health_checks_failed: idle connections that failed the target's
            ``health_check`` before being lent, and were closed.

    These always hold: ``open == idle + in_use``, ``open == created - closed``,
    and ``created + reused`` is the number of session attempts that got a
    connection, plus (with ``Target.min_idle``) the connections opened in the
    background that no session has used yet.
    """

    open: int = 0
    idle: int = 0
    in_use: int = 0
    connecting: int = 0
    waiting: int = 0
    created: int = 0
    reused: int = 0
    closed: int = 0
    failed: int = 0
    retries: int = 0
    health_checks_failed: int = 0


class _State:
    CONNECTING = "connecting"
    IN_USE = "in use"
    IDLE = "idle"
    CLOSED = "closed"


class AddressLedger:
    """The per-address part of a pool, for a target whose name has several addresses.

    A named target keeps one :class:`KeepAlivePool` (one slot count for
    ``max_connections``, one LIFO idle stack, one queue of waiters) and, in
    it, one ledger per address: which of its connections are to that address
    and what happened to them. :meth:`KeepAlivePool.address_stats` turns the
    ledgers into one :class:`PoolStats` per address. Written by the pool only.
    """

    __slots__ = (
        "address",
        "closed",
        "connecting",
        "created",
        "dropped",
        "entries",
        "failed",
        "health_checks_failed",
        "reused",
    )

    def __init__(self, address: object) -> None:
        self.address = address
        # Connections of this address, open and lent or idle (not CONNECTING).
        self.entries: set[PooledConnection] = set()
        self.connecting = 0
        self.created = 0
        self.reused = 0
        self.closed = 0
        self.failed = 0
        self.health_checks_failed = 0
        # The address left the target's answer: its connections close once idle.
        self.dropped = False


def _socket_readable(sock: trio.socket.SocketType) -> bool:
    """Whether the kernel holds bytes (or an EOF) for ``sock``, without blocking."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock.fileno()], [], [], 0)  # pragma: no cover - Windows
    return bool(readable)


def _poller(sock: trio.socket.SocketType | None) -> Any:
    """A ``select.poll`` object for ``sock``, made once per connection (None without one)."""
    if sock is None or not hasattr(select, "poll"):
        return None  # pragma: no cover - Windows falls back to select()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return poller


def _raw_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.socket if isinstance(stream, trio.SocketStream) else None


class PooledConnection:
    """The pool's record of one connection (private to the client layer)."""

    __slots__ = (
        "check_at",
        "check_due",
        "conn",
        "consuming",
        "expires_at",
        "graceful",
        "idle_deadline",
        "ledger",
        "mark",
        "poller",
        "pool",
        "scope",
        "settle",
        "sock",
        "spoke",
        "state",
        "stats",
        "tls",
        "watch_from",
        "watching",
    )

    def __init__(
        self, pool: KeepAlivePool, conn: Connection[Any, Any], ledger: AddressLedger | None = None
    ) -> None:
        self.pool = pool
        self.conn = conn
        # The connection's live statistics (one object for its life), read
        # at every session.
        self.stats = conn.stats
        # Moves the connection to a state as the pool lends, takes back or
        # keeps it: the connection's own operation, bound once.
        self.mark: Callable[[ConnState], bool] = conn._set_state
        # The address's ledger, for a target with per-address pools (else None).
        self.ledger = ledger
        self.state = _State.CONNECTING
        self.idle_deadline = _INF
        self.sock = _raw_socket(conn.stream)
        self.tls = isinstance(conn.stream, trio.SSLStream)
        self.poller = _poller(self.sock)
        # TLS connections (and streams without a socket) are watched as soon
        # as they are idle, as before settling existed: their watcher reads
        # through the TLS layer (see _watch_idle), a path kept as it was.
        self.settle = _SETTLE if self.sock is not None and not self.tls else 0.0
        # When an idle connection's task starts watching its socket.
        self.watch_from = _INF
        # The cancel scope the connection task sleeps or watches in (None
        # while it runs); `watching` tells which of the two.
        self.scope: trio.CancelScope | None = None
        self.watching = False
        # Set once the idle watcher of a TLS connection started reading
        # through the TLS layer: from then on, bytes may have been consumed.
        self.consuming = False
        # Whether the connection task closes it politely (it was retired, not
        # broken or cancelled).
        self.graceful = True
        # Set by the idle watcher when the peer sent bytes, closed or reset.
        self.spoke = False
        # When the connection's lifetime ends (Target.max_lifetime), and from
        # when on it is health-checked before being lent (inf: never).
        self.expires_at = self.stats.created_at + pool.max_lifetime
        self.check_at = _INF
        # Lent by acquire() with its health check still to run (check_done).
        self.check_due = False

    def wake(self) -> None:
        """Wake the connection task: it re-reads the state (retired, abandoned).

        The task re-reads the state before every sleep, so a change made while
        it is not sleeping is never missed.
        """
        if self.scope is not None:
            self.scope.cancel()

    def left_unread(self) -> bool:
        """Whether a session left anything to read: messages or part of one, bytes
        inside the TLS object, or what the idle watcher saw.

        No system call: the peer's bytes still in the kernel are found by
        :meth:`peer_spoke` when the connection is next lent. A connection
        closed meanwhile is found by :meth:`KeepAlivePool.release`.
        """
        conn = self.conn
        return (
            self.spoke or not conn.between_messages or (self.tls and conn.stream.pending() > 0)  # type: ignore[attr-defined]
        )

    def peer_spoke(self) -> bool:
        """Whether the peer sent anything (bytes, EOF, reset) while the connection was idle.

        It asks the kernel (a system call). It does not ask again whether the
        connection is between messages: it was when it went idle (see
        :meth:`left_unread`), and nothing reads it while it is (a TLS
        watcher that reads marks it ``consuming``).
        """
        conn = self.conn
        if self.spoke or conn.is_closed:
            return True
        if self.tls and conn.stream.pending():  # type: ignore[attr-defined]
            return True  # decrypted bytes already buffered inside the TLS object
        if self.poller is not None:
            # Readable means bytes or an EOF; a reset shows as POLLERR/POLLHUP
            # and a closed descriptor as POLLNVAL: all of them are stale.
            return bool(self.poller.poll(0))
        return self.sock is not None and _socket_readable(self.sock)  # pragma: no cover


class _Waiter:
    __slots__ = ("closed", "entry", "event", "fresh", "granted")

    def __init__(self, fresh: bool) -> None:
        self.fresh = fresh
        self.event = trio.Event()
        self.granted = False
        self.closed = False
        # None with granted=True: a free slot to open a new connection in.
        self.entry: PooledConnection | None = None


class KeepAlivePool:
    """The keep-alive connections of one target, and the sessions waiting for one.

    Args:
        name: the target, as text for errors and logs.
        max_connections: the most connections (open or being opened) at once.
        check_after: seconds of idleness after which a connection is lent
            only through :meth:`acquire`, marked ``check_due`` (None: never).
        max_lifetime: seconds after its connect at which a connection is
            retired rather than pooled (None: no limit).
        min_idle: idle connections the client keeps open in the background
            (:meth:`take_spare_slot`); such a pool is never :attr:`unused`.

    Reuse is LIFO: the connection used last is the warmest (its peer is the
    least likely to have timed it out). Waiters are served FIFO, and a slot or
    a connection is handed to a waiter directly, so a newcomer never jumps the
    queue.
    """

    def __init__(
        self,
        name: str,
        max_connections: int,
        *,
        check_after: float | None = None,
        max_lifetime: float | None = None,
        min_idle: int = 0,
    ) -> None:
        self.name = name
        self.max_connections = max_connections
        self.check_after = _INF if check_after is None else check_after
        self.max_lifetime = _INF if max_lifetime is None else max_lifetime
        # Whether release() has more to do than the keep-alive deadline.
        self._tuned = check_after is not None or max_lifetime is not None
        self.min_idle = min_idle
        # Background connects under way for min_idle, and the event that
        # wakes the task making them when the pool may be short again.
        self._spare_connecting = 0
        self._spare_wanted: trio.Event | None = None
        self._idle: list[PooledConnection] = []
        self._waiters: deque[_Waiter] = deque()
        self._connecting = 0
        self._in_use = 0
        self._created = 0
        self._reused = 0
        self._closed = 0
        self._failed = 0
        self._retries = 0
        self._health_checks_failed = 0
        self._closing = False
        # One ledger per address, for a target with per-address pools.
        self._ledgers: dict[object, AddressLedger] = {}
        # The run's clock, bound once (cheaper than trio.current_time() on
        # every lend and release; still the MockClock under test).
        self._now = trio.lowlevel.current_clock().current_time

    def stats(self) -> PoolStats:
        """A consistent snapshot of the counters (see :class:`PoolStats`)."""
        idle = len(self._idle)
        return PoolStats(
            open=idle + self._in_use,
            idle=idle,
            in_use=self._in_use,
            connecting=self._connecting,
            waiting=len(self._waiters),
            created=self._created,
            reused=self._reused,
            closed=self._closed,
            failed=self._failed,
            retries=self._retries,
            health_checks_failed=self._health_checks_failed,
        )

    @property
    def unused(self) -> bool:
        """No connection (idle, lent or being opened) and no session waiting for one."""
        return not (
            self._idle or self._in_use or self._connecting or self._waiters or self.min_idle
        )

    def _slots_taken(self) -> int:
        return self._connecting + self._in_use + len(self._idle)

    # -- lending -------------------------------------------------------------

    async def acquire(
        self, pool_timeout: float | None, *, fresh: bool = False
    ) -> PooledConnection | None:
        """Lend a pooled connection, or grant a slot to open a new one.

        Returns the entry of an idle connection (now ``IN_USE``; counted as
        reused), or ``None``: the caller then holds a ``CONNECTING`` slot and
        must end it with :meth:`connected`, :meth:`abandon_new` or
        :meth:`cancel_connecting`. ``fresh=True`` (the retry after a reused
        connection failed) always grants a slot for a new connection.

        Raises:
            CommTimeout: phase ``"pool"``: no slot within ``pool_timeout``.
            trio.ClosedResourceError: the client is closing.
        """
        while True:
            if self._closing:
                await trio.lowlevel.checkpoint()
                raise trio.ClosedResourceError(f"the client of {self.name} is closed")
            if not fresh:
                entry = self.lend_idle(checks=True)
                if entry is not None:
                    return entry
            if not self._waiters and self._slots_taken() < self.max_connections:
                # No checkpoint from here on: the caller must own the slot
                # before anything can cancel it.
                self._connecting += 1
                return None
            if fresh and self._idle and not self._waiters:
                # The pool is full of idle connections; make room for a new one.
                self._retire(self._idle[0], "room for a fresh connection")
                continue
            entry = await self._wait(pool_timeout, fresh)
            if entry is not None:
                self._count_reuse(entry)
            return entry

    def lend_idle(self, *, checks: bool = False) -> PooledConnection | None:
        """Lend the most recently pooled sound connection (now ``IN_USE``), or None.

        The usual case of :meth:`acquire`, callable without a coroutine: no
        checkpoint, no waiting, no slot. None when no idle connection is sound
        or the client is closing; the caller then goes through :meth:`acquire`.
        Idle connections found stale on the way are retired (LIFO: the most
        recently pooled is tried first).

        One that is due for a health check is left on the stack when
        ``checks`` is False (the caller cannot run it), else lent marked
        ``check_due``: the caller runs the check and ends it with
        :meth:`check_done`, which counts it reused. Any other is counted
        reused here.
        """
        if self._closing:
            return None
        idle = self._idle
        now = self._now()
        while idle:
            entry = idle.pop()
            if entry.idle_deadline <= now:
                self._retire(entry, "keep-alive time is up", popped=True)
                continue
            if entry.consuming or entry.peer_spoke():
                self._retire(entry, "the peer closed or sent data while idle", popped=True)
                continue
            if entry.check_at <= now:
                if not checks:
                    idle.append(entry)
                    return None
                entry.check_due = True
            else:
                self._reused += 1
                if entry.ledger is not None:
                    entry.ledger.reused += 1
            entry.state = _State.IN_USE
            self._in_use += 1
            entry.mark(ConnState.CONNECTED)
            if self.min_idle:
                self._spare_maybe_wanted()
            if entry.watching:
                # Aborting wait_readable is synchronous: the socket is ours now.
                entry.wake()
            # A task still settling is left asleep: when its deadline comes it
            # finds the connection in use and sleeps on.
            return entry
        return None

    def _count_reuse(self, entry: PooledConnection) -> None:
        self._reused += 1
        if entry.ledger is not None:
            entry.ledger.reused += 1

    async def _wait(self, pool_timeout: float | None, fresh: bool) -> PooledConnection | None:
        waiter = _Waiter(fresh)
        self._waiters.append(waiter)
        deadline = _INF if pool_timeout is None else trio.current_time() + pool_timeout
        try:
            with trio.CancelScope(deadline=deadline):
                await waiter.event.wait()
        except BaseException:
            self._abandon_wait(waiter)
            raise
        if waiter.closed:
            raise trio.ClosedResourceError(f"the client of {self.name} is closed")
        if not waiter.granted:
            self._abandon_wait(waiter)
            raise CommTimeout("pool", pool_timeout or 0.0, self.name)
        return waiter.entry

    def _abandon_wait(self, waiter: _Waiter) -> None:
        """A waiter leaves (cancelled, timed out): it must not take a slot with it."""
        if not waiter.granted:
            if not waiter.closed:
                self._waiters.remove(waiter)
            return
        # Granted in the same instant it was cancelled (the netty#9669 race):
        # pass what it was given on to the next in line.
        waiter.granted = False
        if waiter.entry is None:
            self._connecting -= 1
            self._slot_freed()
        else:
            entry, waiter.entry = waiter.entry, None
            self._in_use -= 1
            self._give_back(entry, self._now())

    def _grant(self, entry: PooledConnection | None) -> bool:
        """Hand a connection (or, with ``None``, a free slot) to the first waiter."""
        if self._closing or not self._waiters:
            return False
        waiter = self._waiters.popleft()
        if entry is not None and waiter.fresh:
            # A retry must not get another pooled connection: trade it for its slot.
            entry.state = _State.IN_USE
            self._in_use += 1
            self._retire(entry, "room for a fresh connection", regrant=False)
            entry = None
        if entry is None:
            self._connecting += 1
        else:
            entry.state = _State.IN_USE
            self._in_use += 1
            entry.mark(ConnState.CONNECTED)  # lent again, as from the idle stack
        waiter.granted = True
        waiter.entry = entry
        waiter.event.set()
        return True

    def _slot_freed(self) -> None:
        self._grant(None)

    # -- min_idle --------------------------------------------------------------

    def _short_of_idle(self) -> bool:
        # Waiters come first: a slot goes to them, not to a spare.
        return (
            len(self._idle) + self._spare_connecting < self.min_idle
            and not self._waiters
            and self._slots_taken() < self.max_connections
        )

    def _spare_maybe_wanted(self) -> None:
        event = self._spare_wanted
        if event is not None:
            self._spare_wanted = None
            event.set()

    async def take_spare_slot(self) -> None:
        """Wait until the pool is short of idle connections, then hold a ``CONNECTING`` slot.

        The caller opens a connection in it and ends it with
        :meth:`spare_ready`, or, if that failed, with the usual
        :meth:`cancel_connecting` / :meth:`abandon_new` and then
        :meth:`spare_failed`.

        Raises:
            trio.ClosedResourceError: the client is closing.
        """
        while not self._short_of_idle() or self._closing:
            if self._closing:
                raise trio.ClosedResourceError(f"the client of {self.name} is closed")
            event = self._spare_wanted = self._spare_wanted or trio.Event()
            await event.wait()
        self._connecting += 1
        self._spare_connecting += 1

    def spare_ready(self, entry: PooledConnection, *, keepalive: float | None) -> None:
        """A background connection is open: count it created and pool it as idle."""
        self._spare_connecting -= 1
        self.connected(entry)
        self.release(entry, reusable=True, keepalive=keepalive)

    def spare_failed(self) -> None:
        """A background connect taken with :meth:`take_spare_slot` failed."""
        self._spare_connecting -= 1

    # -- taking back ---------------------------------------------------------

    def connected(self, entry: PooledConnection) -> None:
        """A new connection is ready (``CONNECTING → IN_USE``) for its first session."""
        if entry.state is not _State.CONNECTING:
            return  # the client closed meanwhile; the session will fail on it
        self._connecting -= 1
        entry.state = _State.IN_USE
        self._in_use += 1
        self._created += 1
        ledger = entry.ledger
        if ledger is not None:
            ledger.connecting -= 1
            ledger.created += 1
            ledger.entries.add(entry)
            if ledger.dropped:
                entry.expires_at = -_INF  # closed after this session

    def cancel_connecting(self) -> None:
        """Give back a ``CONNECTING`` slot whose connection never came to be."""
        self._connecting -= 1
        self._slot_freed()

    def abandon_new(self, entry: PooledConnection) -> None:
        """A new connection failed before its first session (e.g. in ``on_connect``)."""
        if entry.state is _State.CONNECTING:
            self._connecting -= 1
            if entry.ledger is not None:
                entry.ledger.connecting -= 1
                self._forget_if_gone(entry.ledger)
            entry.state = _State.CLOSED
            entry.graceful = False
            entry.wake()
            self._slot_freed()

    def record_failure(self, entry: PooledConnection | None = None) -> None:
        """Count one failed session attempt (on ``entry``'s address, if it has one)."""
        self._failed += 1
        if entry is not None and entry.ledger is not None:
            entry.ledger.failed += 1

    def record_retry(self) -> None:
        """Count one failed session attempt that is tried again."""
        self._retries += 1

    def check_done(self, entry: PooledConnection, ok: bool | None) -> None:
        """The health check of a connection lent ``check_due`` ended.

        True: it passed, the connection serves the session (counted as
        reused). False: it failed: counted, and the connection retired.
        None: it was cancelled: the connection is retired, nothing counted.
        """
        entry.check_due = False
        if ok:
            entry.check_at = _INF
            self._count_reuse(entry)
            return
        if ok is not None:
            self._health_checks_failed += 1
            if entry.ledger is not None:
                entry.ledger.health_checks_failed += 1
        entry.graceful = False
        self._retire(entry, "failed its health check" if ok is False else "check cancelled")

    def release(
        self, entry: PooledConnection, *, reusable: bool, keepalive: float | None = None
    ) -> None:
        """The session on ``entry`` ended: pool the connection or retire it.

        Synchronous on purpose: callers run it first, before any ``await``, so
        that a cancellation cannot skip it.
        """
        if entry.state is not _State.IN_USE:
            return  # already retired (the client closed while it was lent)
        if reusable and not entry.mark(ConnState.SUCCESS):
            reusable = False  # closed, or failed, by the session
        if not reusable or keepalive == 0 or self._closing:
            entry.graceful = reusable
            self._retire(entry, "not reusable" if not reusable else "keep-alive is 0")
            return
        now = self._now()
        entry.idle_deadline = _INF if keepalive is None else now + keepalive
        if self._tuned:
            if now >= entry.expires_at:
                self._retire(entry, "its max_lifetime is over, or its address left the answer")
                return
            entry.idle_deadline = min(entry.idle_deadline, entry.expires_at)
            entry.check_at = now + self.check_after
        self._in_use -= 1
        self._give_back(entry, now)

    def _give_back(self, entry: PooledConnection, now: float) -> None:
        """A sound connection is free: to the first waiter, else onto the idle stack."""
        if self._waiters and self._grant(entry):
            return
        entry.state = _State.IDLE
        entry.mark(ConnState.IDLE)
        self._idle.append(entry)
        # Schedule the idle watch, waking no one: the connection task's
        # deadline is only ever moved earlier here; if it wakes too early
        # (the connection was lent again meanwhile, or went idle again
        # later), it goes back to sleep until the right moment.
        entry.watch_from = now + entry.settle
        scope = entry.scope
        if scope is not None and not entry.watching:
            due = min(entry.watch_from, entry.idle_deadline)
            if due < scope.deadline:
                scope.deadline = due

    def _retire(
        self,
        entry: PooledConnection,
        reason: str,
        *,
        popped: bool = False,
        regrant: bool = True,
    ) -> None:
        """Account a connection as closed and tell its task to close it."""
        if entry.state is _State.IDLE and not popped:
            self._idle.remove(entry)
        elif entry.state is _State.IN_USE:
            self._in_use -= 1
        elif entry.state is _State.CONNECTING:
            self._connecting -= 1
            if entry.ledger is not None:
                entry.ledger.connecting -= 1
                self._forget_if_gone(entry.ledger)
            entry.state = _State.CLOSED
            entry.wake()
            if regrant:
                self._slot_freed()
            return
        elif entry.state is _State.CLOSED:
            return
        logger.debug("closing connection to %s: %s", entry.conn.peer, reason)
        entry.state = _State.CLOSED
        self._closed += 1
        ledger = entry.ledger
        if ledger is not None:
            ledger.closed += 1
            ledger.entries.discard(entry)
            self._forget_if_gone(ledger)
        entry.wake()
        if regrant:
            self._slot_freed()
        if self.min_idle:
            self._spare_maybe_wanted()

    def close(self) -> None:
        """The client is closing: refuse new sessions and retire idle connections."""
        self._closing = True
        self._spare_maybe_wanted()  # the task making spares sees the close and ends
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.closed = True
            waiter.event.set()
        for entry in list(self._idle):
            self._retire(entry, "the client is closing")

    # -- per-address pools ----------------------------------------------------

    def ledger(self, address: object) -> AddressLedger:
        """The ledger of ``address``, made on first use."""
        ledger = self._ledgers.get(address)
        if ledger is None:
            ledger = self._ledgers[address] = AddressLedger(address)
        return ledger

    def record_connect_failure(self, address: object) -> None:
        """A connect to ``address`` failed (counted in that address's ``failed``)."""
        self.ledger(address).failed += 1

    def address_load(self) -> dict[object, tuple[int, int]]:
        """``address -> (connections being opened or in use, connections open)``."""
        idle: dict[object, int] = {}
        for entry in self._idle:
            if entry.ledger is not None:
                address = entry.ledger.address
                idle[address] = idle.get(address, 0) + 1
        load = {}
        for address, ledger in self._ledgers.items():
            opened = len(ledger.entries)
            load[address] = (ledger.connecting + opened - idle.get(address, 0), opened)
        return load

    def keep_addresses(self, addresses: Collection[object]) -> None:
        """The target's answer is now ``addresses``: the connections of the others go.

        Idle ones are closed now; lent ones when their session ends. An
        address that comes back is used again at once.
        """
        for address in addresses:
            self.ledger(address).dropped = False
        for ledger in list(self._ledgers.values()):
            if ledger.address in addresses or ledger.dropped:
                continue
            ledger.dropped = True
            self._tuned = True  # release() now looks at expires_at
            for entry in list(ledger.entries):
                entry.expires_at = -_INF
                if entry.state is _State.IDLE:
                    self._retire(entry, f"{ledger.address} left the answer of {self.name}")
            self._forget_if_gone(ledger)

    def _forget_if_gone(self, ledger: AddressLedger) -> None:
        """Drop the ledger of an address that left the answer once it has no connection.

        So that a name whose addresses keep changing (pods coming and going)
        keeps ledgers only for the addresses it has now or still uses.
        """
        gone = ledger.dropped and not ledger.entries and not ledger.connecting
        if gone and self._ledgers.get(ledger.address) is ledger:
            del self._ledgers[ledger.address]

    def address_stats(self, connecting: Mapping[Any, int]) -> dict[Any, PoolStats]:
        """One :class:`PoolStats` per address: those in the answer, and others still open.

        ``connecting`` adds the connects under way that have no connection
        yet (the client counts those). ``waiting`` and ``retries`` belong to
        the target as a whole and are 0 here; ``failed`` counts failed
        connects to the address and failed sessions on its connections.
        """
        load = self.address_load()
        result = {}
        for address, ledger in self._ledgers.items():
            if ledger.dropped and not ledger.entries and not ledger.connecting:
                continue
            busy, opened = load[address]
            in_use = busy - ledger.connecting
            result[address] = PoolStats(
                open=opened,
                idle=opened - in_use,
                in_use=in_use,
                connecting=ledger.connecting + connecting.get(address, 0),
                created=ledger.created,
                reused=ledger.reused,
                closed=ledger.closed,
                failed=ledger.failed,
                health_checks_failed=ledger.health_checks_failed,
            )
        return result

    # -- the connection task -------------------------------------------------

    async def connection_task(
        self,
        open_connection: Callable[[], Awaitable[tuple[Connection[Any, Any], object]]],
        started: list[PooledConnection],
        *,
        task_status: trio.TaskStatus[PooledConnection | Exception] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one connection's life: connect, serve sessions, keep alive, close.

        Started with ``nursery.start`` by the session that needs a new
        connection: until ``task_status.started`` it runs under that session
        (so cancelling the session cancels the connect). A connect failure is
        handed to the session as a value rather than raised, so it never
        becomes an ``ExceptionGroup`` and never reaches the client's nursery.
        ``started`` receives the entry before it is handed over, so the session
        can retire it even if it is cancelled in that very instant.
        ``open_connection`` returns the connection and the address it went to
        (its ledger's key), or None for a target without per-address pools.
        """
        try:
            conn, address = await open_connection()
        except Exception as exc:
            task_status.started(exc)
            return
        ledger = None
        if address is not None:
            ledger = self.ledger(address)
            ledger.connecting += 1
        entry = PooledConnection(self, conn, ledger)
        started.append(entry)
        task_status.started(entry)
        try:
            await self._live(entry)
        except Exception:  # pragma: no cover - a bug here must not kill the client
            logger.exception("connection task for %s failed", conn.peer)
        finally:
            # Bookkeeping before any await: a cancelled close would skip it.
            if entry.state is not _State.CLOSED:
                entry.graceful = False
                self._retire(entry, "the client is closing")
            with trio.CancelScope(shield=True):
                if entry.graceful and not conn.is_closed:
                    with trio.move_on_after(_CLOSE_GRACE):
                        await conn.aclose()
                await trio.aclose_forcefully(conn)

    async def _live(self, entry: PooledConnection) -> None:
        while True:
            state = entry.state
            if state is _State.CLOSED:
                return
            due = _INF
            if state is _State.IDLE:
                now = trio.current_time()
                if now >= entry.idle_deadline:
                    self._retire(entry, "keep-alive time is up")
                    continue
                if now >= entry.watch_from:
                    await self._watch_idle(entry)
                    continue
                due = min(entry.watch_from, entry.idle_deadline)
            # CONNECTING or IN_USE (the session runs in its own task), or idle
            # and settling. The pool moves `due` without waking this task
            # (_give_back) and cancels the scope when the connection is retired.
            with trio.CancelScope(deadline=due) as scope:
                entry.scope = scope
                try:
                    await trio.sleep_forever()
                finally:
                    entry.scope = None

    async def _watch_idle(self, entry: PooledConnection) -> None:
        """Wait in keep-alive until the deadline, the peer speaks, or a session borrows it."""
        conn = entry.conn
        stream = conn.stream
        with trio.CancelScope(deadline=entry.idle_deadline) as scope:
            entry.scope = scope
            entry.watching = True
            try:
                # Waiting for readability consumes nothing, and a borrower's
                # cancel aborts it synchronously: the socket is free at once.
                if entry.sock is not None:
                    await trio.lowlevel.wait_readable(entry.sock)
                if entry.tls or entry.sock is None:
                    # Over TLS a readable socket may carry only a session
                    # ticket. A real receive tells: the TLS layer handles
                    # tickets and keeps waiting; data, close_notify, EOF or a
                    # reset end it. Once it has consumed bytes, though, no one
                    # can tell a ticket from part of a stray record, so a
                    # borrower finding `consuming` set discards the connection.
                    entry.consuming = True
                    await stream.receive_some(1)
                entry.spoke = True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                entry.spoke = True  # a reset: stale as well
            finally:
                entry.scope = None
                entry.watching = False
        if entry.state is _State.IDLE and entry.spoke:
            entry.graceful = False
            self._retire(entry, "the peer closed or sent data while idle")
        # Otherwise the keep-alive time is up (_live retires it), or a session
        # borrowed the connection, maybe already giving it back before this
        # task ran again (_live then settles it anew).
