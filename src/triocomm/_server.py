"""Services: listen, accept, and answer passive sessions.

:func:`serve` answers requests with a handler that returns the reply;
:func:`serve_connections` hands each whole connection to a handler that has
full control (streaming, server push). Both run one service nursery holding
the accept loops, one task per connection, and (with ``idle=``) one watcher
task for idle detection. The running service is a :class:`Server`, which
reports :class:`ServerStats` and shuts down gracefully.

This layer sits on top of :class:`Connection`: it sets the connection's state
and per-phase limits and never touches bytes itself.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import math
import os
import socket
import stat
import sys
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from ._connection import Connection, ConnState, Idle, _socket_of, format_address
from ._errors import CommError, CommTimeout, ConnectionLost, FrameTooLarge, ProtocolError
from ._framing import Codec
from ._timeouts import ServerTimeouts
from ._watchdog import Watchdog

__all__ = ["Server", "ServerStats", "serve", "serve_connections"]

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("triocomm.server")

#: Requests answered before their replies are written, at most: past this a
#: pipelined burst is flushed in several writes, so replies waiting in memory
#: stay bounded even when one read brought thousands of tiny requests.
MAX_REPLY_BATCH = 256
# Accept fails with these when the process or the system is out of a resource
# that closing connections gives back; the service waits and tries again.
_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_BACKOFF = 0.1
# Closing gracefully may need a write (TLS close_notify); never wait longer.
_CLOSE_LIMIT = 5.0
# On POSIX systems, shutting a socket's read side wakes a read blocked on it;
# elsewhere a keep-alive wait is ended with a cancel scope instead.
_SHUT_RD_WAKES_READERS = sys.platform != "win32"

RequestHandler = Callable[[In, Connection[In, Out]], Awaitable[Out | None]]
ConnectionHandler = Callable[[Connection[In, Out]], Awaitable[object]]
IdleCallback = Callable[[Connection[Any, Any], Idle], Awaitable[object]]


@dataclass(slots=True)
class ServerStats:
    """Live counters of a running :class:`Server`.

    Attributes:
        connections_open: connections accepted and not yet closed (a TLS
            handshake in progress counts).
        connections_total: connections accepted since the service started.
        sessions: requests handed to the handler of :func:`serve`; with
            :func:`serve_connections`, connections handed to the handler.
        errors: failures by kind, a :class:`collections.Counter` (a kind that
            never happened reads as 0): ``"handler"`` (the handler raised or
            returned a reply the codec cannot encode), ``"protocol"`` (bytes
            the codec rejected), ``"frame_too_large"``, ``"timeout"`` (any
            phase except ``keepalive``, whose expiry is routine),
            ``"handshake"`` (TLS failed or timed out), ``"connection_lost"``
            (reset or closed mid-message), ``"on_idle"`` (the idle callback
            raised) and ``"accept"`` (accept failed for lack of resources).
    """

    connections_open: int = 0
    connections_total: int = 0
    sessions: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class _HandlerFailed(Exception):
    """The user's request handler raised (or its reply could not be encoded)."""

    def __init__(self, error: Exception, what: str) -> None:
        super().__init__(what)
        self.error = error
        self.what = what


class _Entry:
    """The service's bookkeeping for one accepted connection."""

    __slots__ = (
        "closing",
        "conn",
        "evictable",
        "idle_callback",
        "idle_due",
        "idle_fired",
        "scope",
        "server",
        "sock",
        "waiting",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn: Connection[Any, Any] | None = None
        # True while the connection waits for the first byte of a request.
        self.waiting = False
        # Set when the service ends that wait (eviction, shutdown).
        self.closing = False
        # True while the request loop waits for a request between two
        # others: went_quiet then makes the connection evictable.
        self.evictable = False
        # How the wait is ended: shutting the socket's read side (see
        # _end_wait), or, for a stream without one, cancelling this scope.
        self.sock: trio.socket.SocketType | None = None
        self.scope: trio.CancelScope | None = None
        # Idle detection state, only made when the service has idle= set.
        self.idle_fired: dict[Idle, float] | None = None
        self.idle_callback: trio.CancelScope | None = None
        # Statuses that came due while the callback was busy, each at most once.
        self.idle_due: list[Idle] | None = None

    def went_quiet(self) -> None:
        """Called by the connection when a read of it must wait (``Connection._on_wait``).

        From then on the connection is idle, so it may be evicted to make
        room (in the order connections went quiet): a keep-alive connection
        whose next request is already in its socket never is, and a busy
        one costs no bookkeeping for a round that finds its request there.
        """
        if self.evictable:
            server = self.server
            server._keepalive[self] = None
            server._wake_acceptors()


def _peer_of(stream: trio.abc.Stream) -> str:
    if not isinstance(stream, trio.SocketStream):
        return "unknown peer"
    try:
        return format_address(stream.socket.getpeername())
    except OSError:
        return "unknown peer"


# -- listeners ---------------------------------------------------------------


async def _open_listeners(
    port: int | None, host: str | bytes | None, path: str | os.PathLike[str] | None
) -> list[trio.SocketListener]:
    """Open the listening sockets of a service: TCP on ``host``/``port`` or a Unix ``path``.

    The one place that makes listeners, so that a later multi-process mode
    can hand in pre-made ``SO_REUSEPORT`` listeners instead.
    """
    if path is not None:
        if port is not None or host is not None:
            raise ValueError("give either port (and host) or path, not both")
        return [await _open_unix_listener(os.fspath(path))]
    if port is None:
        raise ValueError("give a port (0 picks a free one) or a Unix socket path=")
    return await trio.open_tcp_listeners(port, host=host)


async def _open_unix_listener(path: str) -> trio.SocketListener:
    await _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left behind by a dead service; refuse a live one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe:
        try:
            await probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: a leftover
            return
    raise OSError(errno.EADDRINUSE, "a service is already listening on this socket", path)


def _socket_identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- the service -------------------------------------------------------------


class Server:
    """A running service, as returned by ``await nursery.start(partial(serve, ...))``.

    Do not create one yourself: :func:`serve` and :func:`serve_connections`
    make it and hand it over once the listeners are bound, so a client may
    connect as soon as ``nursery.start`` returns.

    Stop it with :meth:`shutdown` (graceful) or by cancelling the task that
    runs :func:`serve` (immediate).
    """

    def __init__(
        self,
        listeners: list[trio.SocketListener],
        body: Callable[[Server, Connection[Any, Any], _Entry], Awaitable[None]],
        *,
        codec: Codec[Any, Any],
        ssl_context: Any,
        timeouts: ServerTimeouts,
        max_connections: int,
        idle: Mapping[Idle, float] | None,
        on_idle: IdleCallback | None,
        unix_path: str | None,
    ) -> None:
        self._listeners = listeners
        self._body = body
        self._codec = codec
        self._ssl_context = ssl_context
        self._timeouts = timeouts
        self._max = max_connections
        self._idle_periods = dict(idle or {})
        self._on_idle = on_idle
        self._unix_path = unix_path
        self._unix_identity = _socket_identity(unix_path) if unix_path else None
        self._stats = ServerStats()
        self._addresses = [listener.socket.getsockname() for listener in listeners]
        self._entries: set[_Entry] = set()
        # Keep-alive connections waiting for their next request, longest idle first.
        self._keepalive: OrderedDict[_Entry, None] = OrderedDict()
        # Accept loops park here while the service is full; how many do.
        self._room = trio.lowlevel.ParkingLot()
        self._parked = 0
        self._service: trio.Nursery | None = None
        self._accepting = trio.CancelScope()
        self._draining = False
        self._stop = trio.Event()
        self._drained = trio.Event()
        self._done = trio.Event()
        # Idle detection: a heap of (due, tiebreak, entry, status), checked lazily.
        self._idle_heap: list[tuple[float, int, _Entry, Idle]] = []
        self._idle_tiebreak = itertools.count()
        self._idle_dead = 0
        self._idle_sleep: trio.CancelScope | None = None
        # Times the waiting reads of every connection (see _watchdog.py).
        self._watchdog = Watchdog()

    # -- public surface ------------------------------------------------------

    @property
    def port(self) -> int | None:
        """The bound TCP port (the one the OS chose for port 0); ``None`` on a Unix socket."""
        for address in self._addresses:
            if isinstance(address, tuple):
                return int(address[1])
        return None

    @property
    def addresses(self) -> list[Any]:
        """Every bound address: ``(host, port, ...)`` tuples, or the Unix socket path."""
        return list(self._addresses)

    @property
    def stats(self) -> ServerStats:
        """Live :class:`ServerStats`."""
        return self._stats

    @property
    def shutting_down(self) -> bool:
        """True once :meth:`shutdown` was called: a long-running connection
        handler can check it to finish early instead of waiting to be cancelled."""
        return self._draining

    def __repr__(self) -> str:
        where = ", ".join(format_address(a) for a in self._addresses)
        return f"<Server {where} open={self._stats.connections_open}>"

    async def shutdown(self, grace: float | None = 5.0) -> None:
        """Stop the service gracefully and return when every connection task has ended.

        At once: stop accepting (the listening sockets close, so new clients
        are refused) and close every keep-alive connection that is waiting
        between requests. Sessions in flight run on: every request that has
        reached the server (even one still in the socket's buffer) is answered
        and the reply sent, then those connections close too.
        When ``grace`` seconds have passed (``None``: no limit), whatever is
        left is cancelled. The task running :func:`serve` then returns.

        A :func:`serve_connections` handler has no "between requests" that the
        service can see: it runs until it returns or the grace period ends
        (check :attr:`shutting_down` to end early).

        Calling it again only shortens the grace period. Call it from outside
        the service (not from a handler, which it would wait for).
        """
        if grace is not None and (math.isnan(grace) or grace < 0):
            raise ValueError(f"grace must be >= 0 seconds or None, got {grace!r}")
        service = self._service
        if service is not None and grace is not None:
            deadline = trio.current_time() + grace
            service.cancel_scope.deadline = min(service.cancel_scope.deadline, deadline)
        if not self._draining:
            self._draining = True
            self._accepting.cancel()
            for entry in list(self._entries):
                self._close_if_waiting(entry)
            if self._stats.connections_open == 0:
                self._drained.set()
            self._stop.set()
        await self._done.wait()

    # -- running -------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        try:
            async with trio.open_nursery() as service:
                self._service = service
                # Before the first connection: it times every waiting read.
                await service.start(self._watchdog.run)
                service.start_soon(self._accept_all)
                if self._idle_periods:
                    service.start_soon(self._watch_idle)
                task_status.started(self)
                await self._stop.wait()
                await self._drained.wait()
                # Only the idle watcher and its callbacks can be left now.
                service.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for listener in self._listeners:
                    await trio.aclose_forcefully(listener)
            self._remove_unix_socket()
            self._done.set()

    def _remove_unix_socket(self) -> None:
        path = self._unix_path
        # Only unlink the file we made: another service may have replaced it.
        if path is not None and _socket_identity(path) == self._unix_identity:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _accept_all(self) -> None:
        with self._accepting:
            async with trio.open_nursery() as nursery:
                for listener in self._listeners:
                    nursery.start_soon(self._accept_loop, listener)
        # Stopped accepting: refuse new clients now rather than at exit.
        for listener in self._listeners:
            await trio.aclose_forcefully(listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        stats = self._stats
        room = self._room
        starved_since: float | None = None
        while True:
            # Full, with nobody to evict: stop accepting; the backlog waits.
            while stats.connections_open >= self._max and self._evictable() is None:
                await self._park(room)
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                stats.errors["accept"] += 1
                if starved_since is None:
                    starved_since = trio.current_time()
                    logger.warning(
                        "accept on %s failed: %s (%d connections open); retrying every %gs",
                        format_address(listener.socket.getsockname()),
                        os.strerror(exc.errno or 0),
                        stats.connections_open,
                        _ACCEPT_BACKOFF,
                    )
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            if starved_since is not None:
                logger.warning(
                    "accept on %s works again after %.1fs",
                    format_address(listener.socket.getsockname()),
                    trio.current_time() - starved_since,
                )
                starved_since = None
            try:
                while stats.connections_open >= self._max:
                    victim = self._evictable()
                    if victim is not None:
                        self._evict(victim)
                    await self._park(room)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stats.connections_open += 1
            stats.connections_total += 1
            assert self._service is not None
            self._service.start_soon(self._connection_task, stream)

    def _evictable(self) -> _Entry | None:
        for entry in self._keepalive:
            conn = entry.conn
            if entry.waiting and not entry.closing and conn and not conn._has_unread_bytes:
                return entry
        return None

    def _evict(self, entry: _Entry) -> None:
        self._keepalive.pop(entry, None)
        assert entry.conn is not None
        logger.debug(
            "closing idle keep-alive connection from %s to make room (max_connections=%d)",
            entry.conn.peer,
            self._max,
        )
        _end_wait(entry)

    def _close_if_waiting(self, entry: _Entry) -> None:
        conn = entry.conn
        if entry.waiting and conn is not None and not conn._has_unread_bytes:
            _end_wait(entry)

    async def _park(self, room: trio.lowlevel.ParkingLot) -> None:
        self._parked += 1
        try:
            await room.park()
        finally:
            self._parked -= 1

    def _wake_acceptors(self) -> None:
        # An int, not the ParkingLot's __bool__: every request of every
        # connection passes here on its way to waiting.
        if self._parked:
            self._room.unpark_all()

    # -- one connection ------------------------------------------------------

    async def _connection_task(self, stream: trio.abc.Stream) -> None:
        entry = _Entry(self)
        self._entries.add(entry)
        try:
            peer = _peer_of(stream)
            transport: trio.abc.Stream = stream
            if self._ssl_context is not None:
                secure = await self._handshake(stream, peer)
                if secure is None:
                    return
                transport = secure
            conn: Connection[Any, Any] = Connection(transport, self._codec)
            conn._watchdog = self._watchdog
            conn._on_wait = entry.went_quiet
            entry.conn = conn
            if _SHUT_RD_WAKES_READERS:
                entry.sock = _socket_of(transport)
            if self._idle_periods:
                entry.idle_fired = {}
                entry.idle_due = []
                now = trio.current_time()
                for status, period in self._idle_periods.items():
                    self._push_idle(now + period, entry, status)
            try:
                await self._body(self, conn, entry)
            except Exception as exc:
                if entry.closing and isinstance(exc, trio.BrokenResourceError):
                    pass  # TLS reports the read side we shut as a ragged EOF
                elif self._report(conn, exc):
                    await conn._break()  # failed: ERROR, like a connection error
            finally:
                if entry.idle_callback is not None:
                    entry.idle_callback.cancel()
                with trio.move_on_after(_CLOSE_LIMIT):
                    await conn.aclose()
        finally:
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        stats = self._stats
        stats.connections_open -= 1
        self._entries.discard(entry)
        self._keepalive.pop(entry, None)
        if entry.conn is not None and self._idle_periods:
            self._idle_dead += len(self._idle_periods)
            heap = self._idle_heap
            if self._idle_dead > 256 and 2 * self._idle_dead > len(heap):
                heap[:] = [
                    item for item in heap if item[2].conn is not None and item[2] is not entry
                ]
                heapq.heapify(heap)
                self._idle_dead = 0
        entry.conn = None
        self._wake_acceptors()
        if self._draining and stats.connections_open == 0:
            self._drained.set()

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> trio.SSLStream[Any] | None:
        ssl_stream = trio.SSLStream(stream, self._ssl_context, server_side=True)
        limit = self._timeouts.handshake
        deadline = math.inf if limit is None else trio.current_time() + limit
        failure = None
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                await ssl_stream.do_handshake()
                return ssl_stream
            except trio.BrokenResourceError as exc:
                failure = exc.__cause__ or exc
        if scope.cancelled_caught:
            logger.warning("TLS handshake with %s timed out after %gs", peer, limit)
        else:
            logger.warning("TLS handshake with %s failed: %s", peer, failure)
        self._stats.errors["handshake"] += 1
        await trio.aclose_forcefully(ssl_stream)
        return None

    def _report(self, conn: Connection[Any, Any], exc: Exception) -> bool:
        """Log why a connection ended (one line) and count it; say if it failed."""
        errors = self._stats.errors
        peer = conn.peer
        if isinstance(exc, _HandlerFailed):
            errors["handler"] += 1
            logger.error(
                "closing connection from %s: %s: %r", peer, exc.what, exc.error, exc_info=exc.error
            )
        elif isinstance(exc, trio.EndOfChannel):
            return False  # a connection handler let the peer's clean close escape
        elif isinstance(exc, trio.ClosedResourceError) and conn.is_closed:
            return False  # closed on purpose: by on_idle, eviction or the handler itself
        elif not _from_connection(conn, exc):
            errors["handler"] += 1
            logger.error(
                "closing connection from %s: the connection handler raised %r",
                peer,
                exc,
                exc_info=exc,
            )
        elif isinstance(exc, CommTimeout):
            if exc.phase == "keepalive":
                logger.debug("closing keep-alive connection from %s: idle for %gs", peer, exc.limit)
                return False
            errors["timeout"] += 1
            logger.warning(
                "closing connection from %s: %s timeout (limit %gs)", peer, exc.phase, exc.limit
            )
        elif isinstance(exc, FrameTooLarge):
            errors["frame_too_large"] += 1
            logger.warning("closing connection from %s: frame too large: %s", peer, exc)
        elif isinstance(exc, ProtocolError):
            errors["protocol"] += 1
            logger.warning("closing connection from %s: bad input: %s", peer, exc)
        else:
            errors["connection_lost"] += 1
            logger.info("connection from %s lost: %s", peer, exc)
        return True

    # -- idle detection ------------------------------------------------------

    def _push_idle(self, due: float, entry: _Entry, status: Idle) -> None:
        heapq.heappush(self._idle_heap, (due, next(self._idle_tiebreak), entry, status))
        sleep = self._idle_sleep
        if sleep is not None and due < sleep.deadline:
            sleep.deadline = due

    async def _watch_idle(self) -> None:
        # One task for every connection: each (connection, status) sits in a
        # heap under the earliest moment it could become idle. When that comes
        # the real idle time is checked; I/O since then only pushes it back.
        # So the cost is per idle period, never per read or write.
        heap = self._idle_heap
        periods = self._idle_periods
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, entry, status = heapq.heappop(heap)
                conn = entry.conn
                if conn is None:
                    self._idle_dead -= 1
                    continue
                fired, waiting = entry.idle_fired, entry.idle_due
                assert fired is not None
                assert waiting is not None
                period = periods[status]
                quiet_since = max(now - conn.idle_time(status), fired.get(status, -math.inf))
                due = quiet_since + period
                if due <= now:
                    fired[status] = now
                    due = now + period
                    # One callback task per connection at a time: statuses
                    # that come due meanwhile wait for it, each at most once,
                    # so a slow callback skips beats instead of piling up.
                    if entry.idle_callback is None and self._service is not None:
                        entry.idle_callback = trio.CancelScope()
                        self._service.start_soon(self._call_on_idle, entry, conn, status)
                    elif status not in waiting:
                        waiting.append(status)
                heapq.heappush(heap, (due, next(self._idle_tiebreak), entry, status))
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as sleep:
                self._idle_sleep = sleep
                await trio.sleep_forever()
            self._idle_sleep = None

    async def _call_on_idle(self, entry: _Entry, conn: Connection[Any, Any], status: Idle) -> None:
        scope, waiting = entry.idle_callback, entry.idle_due
        assert scope is not None
        assert waiting is not None
        assert self._on_idle is not None
        try:
            with scope:
                while entry.conn is conn:
                    await self._on_idle(conn, status)
                    if not waiting:
                        break
                    status = waiting.pop(0)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the connection went away while the callback used it
        except Exception as exc:
            self._stats.errors["on_idle"] += 1
            logger.error(
                "closing connection from %s: on_idle(%s) raised %r",
                conn.peer,
                status.name,
                exc,
                exc_info=exc,
            )
            await conn._break()
        finally:
            entry.idle_callback = None
            waiting.clear()


def _from_connection(conn: Connection[Any, Any], exc: Exception) -> bool:
    """Did ``exc`` come from ``conn`` itself (as opposed to the user's own code)?"""
    if isinstance(exc, (ProtocolError, CommTimeout, ConnectionLost)):
        # The connection breaks itself (state ERROR) whenever it raises these.
        return conn.state is ConnState.ERROR
    return isinstance(exc, trio.BrokenResourceError) and not isinstance(exc, CommError)


# -- the two kinds of body ---------------------------------------------------


def _request_body(
    handler: RequestHandler[In, Out],
) -> Callable[[Server, Connection[In, Out], _Entry], Awaitable[None]]:
    async def answer_requests(server: Server, conn: Connection[In, Out], entry: _Entry) -> None:
        # The hot loop of the service: one task per connection, no task or
        # cancel scope per request. A read that brought several requests
        # leaves them decoded in the connection; they are answered in order
        # without further I/O, and their replies leave in one write. Nothing
        # is read while replies are pending, so read-ahead is bounded by one
        # read (RECEIVE_SIZE) plus one unfinished request (the codec's bound).
        # Everything is inlined here: each coroutine frame kept alive by an
        # idle connection costs memory, for every connection. For the same
        # reason the connection's methods are looked up where they are
        # called, not bound once: a bound method kept in this frame would be
        # 64 bytes more per idle connection, to save 20 ns per round.
        t = server._timeouts
        stats = server._stats
        waiting_order = server._keepalive
        conn._limits = t._first_request_limits
        state = ConnState.CONNECTED
        error = ConnState.ERROR
        while True:
            # Wait for the next request: the only place a connection is idle.
            partial = conn._has_unread_bytes
            if (server._draining or entry.closing) and not partial:
                if entry.sock is None:
                    return
                # A request may have reached the socket already: shut the
                # read side and read once more, so it is answered, not reset.
                if not entry.closing:
                    _end_wait(entry)
            # conn._set_state(state), inlined like the state change below
            # (a call costs 100 ns more, twice a round): ERROR is final, and
            # a handler may have closed the connection.
            if conn._state is not error and not conn._closed:
                conn._state = state
            evictable = state is ConnState.KEEPALIVE and not partial
            # Evictable once its read finds nothing and waits.
            entry.evictable = evictable
            entry.waiting = True
            try:
                if entry.sock is not None:
                    # _end_wait shuts the read side to end this wait: a request
                    # that had already arrived is still returned, else
                    # EndOfChannel (a clean close). A read that finds a
                    # request waiting is a cancel point but not a schedule
                    # point: this loop has one in every round (the reply's
                    # send, or the checkpoint below when there is no reply).
                    conn._yield_on_data = False
                    try:
                        request = await conn.receive()
                    finally:
                        conn._yield_on_data = True
                else:
                    scope = entry.scope = trio.CancelScope()
                    with scope:
                        request = await conn.receive()
                    if scope.cancelled_caught:
                        return
            finally:
                entry.waiting = False
                entry.scope = None
                if evictable:
                    entry.evictable = False
                    waiting_order.pop(entry, None)
            if state is ConnState.CONNECTED:
                state = ConnState.KEEPALIVE
                conn._limits = t._keepalive_limits

            # Answer the burst that arrived with it, in order.
            if conn._state is not error and not conn._closed:
                conn._state = ConnState.RECEIVING
            replies: list[Out] = []
            # The rest of the burst, taken at once: no checkpoint per request.
            burst = conn._take_pending(request) if conn._pending else [request]
            for request in burst:
                # conn._begin_session(), inlined: this loop runs once per
                # request, and a method call is a third of its bookkeeping.
                conn._sessions += 1
                stats.sessions += 1
                try:
                    reply = await handler(request, conn)
                except Exception as exc:
                    await _flush_quietly(conn, replies)
                    raise _HandlerFailed(exc, "the handler raised") from exc
                if reply is not None:
                    replies.append(reply)
                    if len(replies) >= MAX_REPLY_BATCH:
                        await _send_replies(conn, replies)
                        replies = []
            if replies:
                # send_many, inlined for the usual case: a helper's frame
                # would be suspended and resumed with every write. The write
                # skips the cancellation check: the round's read made one.
                # A cancellation the handler's own checkpoints did not
                # raise (the handler cancelled the service itself, or it
                # came during the flush of a long burst) is raised by the
                # next read, once the replies of the requests already
                # handled are written.
                try:
                    data = conn._encode_many(replies)
                except TypeError as exc:
                    raise _unencodable(exc) from exc
                # Usually the kernel takes it all at once, and the round's
                # schedule point is this frame's own; else _write finishes
                # the write, waiting for room under the send limits.
                sent = conn._write_nowait(data, len(replies))
                if sent < 0:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                else:
                    await conn._write(data, len(replies), True, sent)
                del data
            else:
                # No reply to send: the schedule point the read skipped, so
                # that a client streaming requests that get no reply cannot
                # keep this task running while others wait.
                await trio.lowlevel.cancel_shielded_checkpoint()
            # The round ends here and the next one sets KEEPALIVE before any
            # other task can run, so SUCCESS, which no one could observe,
            # is not written.
            # Let go of the burst's requests and replies before waiting: a
            # keep-alive connection may wait for minutes, and what its frame
            # holds is memory held per idle connection.
            del burst, replies, request, reply

    return answer_requests


async def _send_replies(conn: Connection[Any, Any], replies: list[Any]) -> None:
    try:
        await conn.send_many(replies)
    except TypeError as exc:
        raise _unencodable(exc) from exc


def _unencodable(exc: TypeError) -> _HandlerFailed:
    # The codec refused a reply before anything was written.
    return _HandlerFailed(exc, "the handler returned a reply the codec cannot encode")


async def _flush_quietly(conn: Connection[Any, Any], replies: list[Any]) -> None:
    # Requests before the failing one were answered: deliver those replies.
    if replies:
        try:
            await conn.send_many(replies)
        except (CommError, trio.BrokenResourceError, trio.ClosedResourceError, TypeError):
            pass


def _end_wait(entry: _Entry) -> None:
    """Close a connection that waits between requests, without losing a request.

    Shutting the socket's read side wakes the waiting read with end-of-file,
    unless a request has arrived meanwhile: the kernel then hands that over
    first, the request is answered (writing still works), and the next read
    sees the end. A cancel scope could not tell the two apart, and one per wait
    would cost more than the rest of a request's bookkeeping.
    """
    entry.closing = True
    if entry.sock is not None:
        try:
            entry.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass  # already gone: the read ends by itself
    elif entry.scope is not None:
        entry.scope.cancel()


def _connection_body(
    handler: ConnectionHandler[In, Out],
) -> Callable[[Server, Connection[In, Out], _Entry], Awaitable[None]]:
    async def run_handler(server: Server, conn: Connection[In, Out], entry: _Entry) -> None:
        t = server._timeouts
        # The handler decides when to read, so every wait for a message is a
        # wait between messages: keepalive bounds it.
        conn._limits = t._keepalive_limits
        conn._begin_session()
        server._stats.sessions += 1
        conn._set_state(ConnState.RECEIVING)
        await handler(conn)
        # Closed straight after, before any other task runs: SUCCESS, which
        # no one could see, is not written (see ConnState).

    return run_handler


# -- entry points ------------------------------------------------------------


def _check_options(
    max_connections: int, idle: Mapping[Idle, float] | None, on_idle: object
) -> None:
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise TypeError(f"max_connections must be an int, got {max_connections!r}")
    if max_connections < 1:
        raise ValueError(f"max_connections must be >= 1, got {max_connections}")
    if idle:
        for status, period in idle.items():
            if not isinstance(status, Idle):
                raise TypeError(
                    f"idle keys must be Idle.READ, Idle.WRITE or Idle.BOTH, got {status!r}"
                )
            if isinstance(period, bool) or not isinstance(period, (int, float)):
                raise TypeError(f"idle period for {status.name} must be seconds, got {period!r}")
            if not period > 0 or math.isinf(period):
                raise ValueError(
                    f"idle period for {status.name} must be > 0 and finite, got {period!r}"
                )
        if on_idle is None:
            raise ValueError("idle= needs on_idle=, the callback to call when a connection is idle")
    elif on_idle is not None:
        raise ValueError("on_idle= needs idle=, e.g. idle={Idle.READ: 30.0}")


async def _serve(
    body: Callable[[Server, Connection[Any, Any], _Entry], Awaitable[None]],
    port: int | None,
    host: str | bytes | None,
    path: str | os.PathLike[str] | None,
    codec: Codec[Any, Any],
    ssl_context: Any,
    timeouts: ServerTimeouts | None,
    max_connections: int,
    idle: Mapping[Idle, float] | None,
    on_idle: IdleCallback | None,
    task_status: trio.TaskStatus[Server],
    *,
    listeners: list[trio.SocketListener] | None = None,
) -> None:
    # ``listeners``: pre-made listening sockets (serve_workers' SO_REUSEPORT
    # ones) used instead of binding ``port``/``host``/``path`` here.
    _check_options(max_connections, idle, on_idle)
    if timeouts is None:
        timeouts = ServerTimeouts()
    elif not isinstance(timeouts, ServerTimeouts):
        raise TypeError(f"timeouts must be a ServerTimeouts, got {type(timeouts).__name__}")
    if listeners is None:
        listeners = await _open_listeners(port, host, path)
    try:
        server = Server(
            listeners,
            body,
            codec=codec,
            ssl_context=ssl_context,
            timeouts=timeouts,
            max_connections=max_connections,
            idle=idle,
            on_idle=on_idle,
            unix_path=os.fspath(path) if path is not None else None,
        )
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    await server._run(task_status)


async def serve(
    handler: RequestHandler[In, Out],
    port: int | None = None,
    *,
    host: str | bytes | None = None,
    path: str | os.PathLike[str] | None = None,
    codec: Codec[In, Out],
    ssl_context: Any = None,
    timeouts: ServerTimeouts | None = None,
    max_connections: int = 2000,
    idle: Mapping[Idle, float] | None = None,
    on_idle: IdleCallback | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a request/reply service until it is shut down or cancelled.

    Every request is a *passive session*: ``await handler(request, conn)``
    returns the reply, or ``None`` to send nothing. Requests that arrive
    together (pipelining) are answered one after another, strictly in order,
    and replies that are ready together leave in one write. ``conn.seq``
    counts the requests on that connection (0 for the first), and
    ``conn.context`` is a dict for per-connection data.

    Start it with ``server = await nursery.start(functools.partial(serve,
    handler, port, codec=...))``: the listeners are bound when ``start``
    returns, and the :class:`Server` it returns gives the port, the stats and
    :meth:`Server.shutdown`.

    Args:
        handler: ``async def handler(request, conn) -> reply | None``.
        port: TCP port; 0 asks the OS for a free one (see ``Server.port``).
        host: address to bind; ``None`` binds every interface (IPv4 and IPv6),
            as :func:`trio.serve_tcp` does.
        path: serve on this Unix socket path instead of a port. A leftover
            socket file that nobody listens on is replaced; the file is removed
            when the service ends.
        codec: the wire format of requests and replies.
        ssl_context: serve TLS; each handshake runs in its connection's own
            task under ``timeouts.handshake``.
        timeouts: a :class:`ServerTimeouts`; the defaults when ``None``.
        max_connections: at most this many open connections. At the limit, a
            new client makes the service close the keep-alive connection that
            has been idle the longest; if none is idle, accepting pauses until
            a connection closes.
        idle: idle periods, e.g. ``{Idle.READ: 30.0}``; ``on_idle`` is called
            when a connection has been idle that long, and again every period
            while it stays idle.
        on_idle: ``async def on_idle(conn, status)``, e.g. to send a heartbeat
            or close the connection. A slow callback does not delay others; a
            connection has at most one callback running.

    Failures are isolated: a handler exception, bad input, an oversized frame,
    a timeout or a failed TLS handshake closes that one connection, logs one
    line on the ``triocomm.server`` logger naming the peer and the cause, and
    counts in ``Server.stats.errors``. Accept failures for lack of file
    descriptors or memory (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``)
    make the service wait 0.1 s and try again, never stop.

    Raises:
        ValueError, TypeError: bad options (before anything is bound).
        OSError: the address cannot be bound.
    """
    await _serve(
        _request_body(handler),
        port,
        host,
        path,
        codec,
        ssl_context,
        timeouts,
        max_connections,
        idle,
        on_idle,
        task_status,
    )


async def serve_connections(
    handler: ConnectionHandler[In, Out],
    port: int | None = None,
    *,
    host: str | bytes | None = None,
    path: str | os.PathLike[str] | None = None,
    codec: Codec[In, Out],
    ssl_context: Any = None,
    timeouts: ServerTimeouts | None = None,
    max_connections: int = 2000,
    idle: Mapping[Idle, float] | None = None,
    on_idle: IdleCallback | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a service that hands each connection to ``await handler(conn)``.

    Use it when one request does not map to one reply: streaming, server
    push, subscriptions. The handler owns the :class:`Connection` (receive,
    send, ``async for``) for as long as it runs; when it returns, the
    connection is closed gracefully. The whole connection is one session
    (``conn.seq`` stays 0).

    Options are those of :func:`serve`, with two differences: each wait for
    the next message is bounded by ``timeouts.keepalive`` (the handler, not
    the service, knows which message comes first, so ``first_request`` does
    not apply); and ``max_connections`` can only pause accepting, since no
    connection is ever "idle between requests" for the service to evict.

    A handler exception closes only its connection (logged, counted as
    ``"handler"``). If the peer closes cleanly, ``receive`` raises
    :class:`trio.EndOfChannel`; letting it escape the handler is fine.
    """
    await _serve(
        _connection_body(handler),
        port,
        host,
        path,
        codec,
        ssl_context,
        timeouts,
        max_connections,
        idle,
        on_idle,
        task_status,
    )
