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

import contextlib
import errno
import logging
import math
import os
import socket
import stat
import sys
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

from ._admission import Admission, Arrival, IPAddress, Network, Refused, parse_networks
from ._connection import Connection, ConnState, Idle, SessionFailed, format_address, socket_of
from ._errors import CommError, CommTimeout, ConnectionLost, FrameTooLarge, ProtocolError
from ._framing import Codec
from ._idle import call_on_idle, check_idle_options, idle_statuses_due
from ._keepalive import check_tcp_keepalive, set_tcp_keepalive
from ._observe import Observer, ObserverSet, check_observers
from ._timeouts import Limits, ServerTimeouts, passive_limits
from ._timers import Timers

__all__ = ["Server", "ServerStats", "serve", "serve_connections"]

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("triocomm.server")

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
ConnectHook = Callable[[Connection[Any, Any]], Awaitable[object]]
CloseHook = Callable[[Connection[Any, Any], "BaseException | None"], object]


@dataclass(slots=True)
class ServerStats:
    """Live counters of a running :class:`Server`.

    Attributes:
        connections_open: connections accepted and not yet closed (a TLS
            handshake in progress counts).
        connections_total: connections accepted since the service started.
        sessions: requests handed to the handler of :func:`serve` (the sum
            of its connections' :attr:`Connection.sessions`, so exact inside
            a handler: its own request is counted); with
            :func:`serve_connections`, connections handed to the handler.
        errors: failures by kind, a :class:`collections.Counter` (a kind that
            never happened reads as 0): ``"handler"`` (the handler raised or
            returned a reply the codec cannot encode), ``"protocol"`` (bytes
            the codec rejected), ``"frame_too_large"``, ``"timeout"`` (any
            phase except ``keepalive``, whose expiry is routine),
            ``"on_connect"`` (the ``on_connect`` hook raised),
            ``"slow_consumer"`` (closed by :meth:`Server.broadcast`),
            ``"handshake"`` (TLS failed or timed out), ``"connection_lost"``
            (reset or closed mid-message), ``"on_idle"`` (the idle callback
            raised), ``"accept"`` (accept failed for lack of resources),
            ``"proxy_protocol"`` (a PROXY header missing, bad or late),
            ``"denied"`` (an address ``allow``/``deny`` refuses) and
            ``"per_ip_limit"`` (past ``max_connections_per_ip``);
            :func:`~triocomm.serve_datagrams` adds ``"overload"`` (a datagram
            dropped because ``max_in_flight`` handlers were running) and
            ``"send"`` (the kernel refused a reply datagram).
        connections_peak: the most connections open at once.
        bytes_received, bytes_sent, messages_received, messages_sent: the
            sums of every connection's :class:`ConnectionStats` (closed ones
            and open ones; bytes as the connections count them, so the
            plaintext under TLS). Brought up to date each time
            :attr:`Server.stats` is read, not per message.

    A datagram service (:func:`~triocomm.serve_datagrams`) has no connections:
    ``connections_open`` and ``connections_total`` stay 0 and ``sessions``
    counts the datagrams handed to the handler.
    """

    connections_open: int = 0
    connections_total: int = 0
    sessions: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    connections_peak: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    messages_sent: int = 0


class _HookFailed(Exception):
    """The service's ``on_connect`` hook raised."""

    def __init__(self, error: Exception) -> None:
        super().__init__("on_connect raised")
        self.error = error


def _cause(exc: Exception) -> BaseException:
    """The exception a user sees for a failure: their own, not the service's wrapper."""
    if isinstance(exc, (SessionFailed, _HookFailed)):
        return exc.error
    return exc


@dataclass(frozen=True)
class ServiceOptions:
    """Every option of a service, checked once: what :func:`serve`,
    :func:`serve_connections` and ``serve_workers`` hand down to the layers below.

    Picklable when its parts are (``serve_workers`` sends it to each worker).
    """

    codec: Codec[Any, Any]
    ssl_context: Any = None
    timeouts: ServerTimeouts = field(default_factory=ServerTimeouts)
    max_connections: int = 2000
    idle: Mapping[Idle, float] = field(default_factory=dict)
    on_idle: IdleCallback | None = None
    tcp_keepalive: float | None = None
    # Admission (see _admission.py): allow/deny are turned into networks here.
    proxy_protocol: bool = False
    allow: tuple[Network, ...] | None = None
    deny: tuple[Network, ...] | None = None
    max_connections_per_ip: int | None = None
    on_connect: ConnectHook | None = None
    on_close: CloseHook | None = None
    observers: tuple[Observer, ...] = ()

    @classmethod
    def build(
        cls,
        codec: Codec[Any, Any],
        ssl_context: Any = None,
        timeouts: ServerTimeouts | None = None,
        max_connections: int = 2000,
        idle: Mapping[Idle, float] | None = None,
        on_idle: IdleCallback | None = None,
        tcp_keepalive: float | None = None,
        proxy_protocol: bool = False,
        allow: Any = None,
        deny: Any = None,
        max_connections_per_ip: int | None = None,
        on_connect: ConnectHook | None = None,
        on_close: CloseHook | None = None,
        observers: Iterable[Observer] | None = None,
    ) -> ServiceOptions:
        """The options as the service functions take them (``None``: the defaults)."""
        return cls(
            codec,
            ssl_context,
            ServerTimeouts() if timeouts is None else timeouts,
            max_connections,
            idle or {},
            on_idle,
            tcp_keepalive=tcp_keepalive,
            proxy_protocol=proxy_protocol,
            allow=allow,
            deny=deny,
            max_connections_per_ip=max_connections_per_ip,
            on_connect=on_connect,
            on_close=on_close,
            observers=check_observers(observers),
        )

    @property
    def admits_all(self) -> bool:
        """No PROXY header to read and nobody to refuse: connections skip admission."""
        return not self.proxy_protocol and (
            self.allow is None and self.deny is None and self.max_connections_per_ip is None
        )

    def __post_init__(self) -> None:
        timeouts = self.timeouts
        if not isinstance(timeouts, ServerTimeouts):
            raise TypeError(f"timeouts must be a ServerTimeouts, got {type(timeouts).__name__}")
        max_connections = self.max_connections
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, got {max_connections!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        idle = check_idle_options(self.idle, self.on_idle)
        for name in ("on_connect", "on_close"):
            hook = getattr(self, name)
            if hook is not None and not callable(hook):
                raise TypeError(f"{name} must be a function or None, got {hook!r}")
        object.__setattr__(self, "idle", idle)
        check_tcp_keepalive(self.tcp_keepalive)
        object.__setattr__(self, "observers", check_observers(self.observers))
        self._check_admission()

    def _check_admission(self) -> None:
        if not isinstance(self.proxy_protocol, bool):
            raise TypeError(f"proxy_protocol must be True or False, got {self.proxy_protocol!r}")
        object.__setattr__(self, "allow", parse_networks("allow", self.allow))
        object.__setattr__(self, "deny", parse_networks("deny", self.deny))
        limit = self.max_connections_per_ip
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise TypeError(f"max_connections_per_ip must be an int or None, got {limit!r}")
            if limit < 1:
                raise ValueError(f"max_connections_per_ip must be >= 1, got {limit}")


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
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.conn: Connection[Any, Any] | None = None
        # Set when the service ends that wait (eviction, shutdown).
        self.closing = False
        # True while the request loop waits for a request between two
        # others: went_quiet then makes the connection evictable.
        self.evictable = False
        # How the wait is ended: shutting the socket's read side (see
        # _end_wait), or, for a stream without one, cancelling this scope.
        self.sock: trio.socket.SocketType | None = None
        self.scope: trio.CancelScope | None = None
        # Idle detection state, only made when the service has idle= set:
        # when each status last fired, the running callback's scope, and
        # statuses that came due while it was busy (each at most once).
        self.idle_fired: dict[Idle, float] | None = None
        self.idle_callback: trio.CancelScope | None = None
        self.idle_due: list[Idle] | None = None

    def begin_wait(self, conn: Connection[Any, Any], keepalive: bool) -> bool:
        """The request loop is about to wait for a request; False: end the connection instead.

        A service that is shutting down, or that chose this connection to make
        room, ends it between requests. A request may have reached the socket
        already: the read side is shut and read once more, so that request is
        answered, not reset.
        """
        if (self.server._draining or self.closing) and conn.between_messages:
            if self.sock is None:
                return False
            if not self.closing:
                _end_wait(self)
        # Evictable once its read finds nothing and waits (went_quiet), and
        # only between requests (Server._evictable looks when it evicts).
        self.evictable = keepalive
        return True

    @property
    def waiting(self) -> bool:
        """Whether the request loop is between requests, waiting for the next one.

        The connection's state says so (``CONNECTED`` or ``KEEPALIVE`` from the
        end of one round to the start of the next), so the loop keeps no flag
        per request. A connection that went quiet stays in the service's list
        of quiet ones until it goes quiet again (moved to the end) or the
        service next looks there for one to evict (and drops it if it woke).
        """
        conn = self.conn
        return conn is not None and self.server._body.request_loop and _waiting(conn)

    def wait_scope(self) -> trio.CancelScope:
        """The scope that ends a wait on a stream without a socket to shut (see _end_wait)."""
        self.scope = trio.CancelScope()
        return self.scope

    def went_quiet(self) -> None:
        """Called by the connection when a read of it must wait (``Connection._on_wait``).

        From then on the connection is idle, so it may be evicted to make
        room (in the order connections went quiet): a keep-alive connection
        whose next request is already in its socket never is, and a busy
        one costs no bookkeeping for a round that finds its request there.
        """
        if self.evictable:
            self.server._went_quiet(self)

    def _on_alarm(self, now: float) -> float:
        """The service's timers look at this connection's idle statuses (see ``_timers.py``)."""
        conn = self.conn
        if conn is None:
            return math.inf
        return self.server._check_idle(self, conn, now)


@contextlib.contextmanager
def _interrupt_as_itself() -> Iterator[None]:
    """Let a KeyboardInterrupt out of the service nursery as itself, not in a group.

    A Ctrl-C that lands in a connection's task comes out of the service
    nursery wrapped in an exception group (with the cancellations it caused);
    the caller of :func:`serve` expects the KeyboardInterrupt it would get
    from any other Trio code.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        interrupts, rest = group.split(KeyboardInterrupt)
        if interrupts is None or (rest is not None and rest.split(trio.Cancelled)[1]):
            raise
        interrupt = interrupts.exceptions[0]
        while isinstance(interrupt, BaseExceptionGroup):
            interrupt = interrupt.exceptions[0]
        raise interrupt from None


def _peer_of(stream: trio.abc.Stream, arrival: Arrival | None = None) -> str:
    if arrival is not None and arrival.proxied_by is not None:
        return format_address(arrival.remote)
    if not isinstance(stream, trio.SocketStream):
        return "unknown peer"
    try:
        return format_address(stream.socket.getpeername())
    except OSError:
        return "unknown peer"


def _proxied(arrival: Arrival | None) -> tuple[object, object] | None:
    """The client's and the balancer's addresses, if a PROXY header named them."""
    if arrival is None or arrival.proxied_by is None:
        return None
    return arrival.remote, arrival.proxied_by


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


class ServiceFront(Protocol):
    """How work reaches a service that accepts no connections (``serve_datagrams``).

    The front owns its sockets and its :class:`ServerStats`. A :class:`Server`
    made with a front (see :func:`run_service`) runs it in the service
    nursery instead of accept loops, reads ``addresses`` and ``stats`` from
    it, and ends once :meth:`run` has returned.
    """

    @property
    def addresses(self) -> list[Any]:
        """Every bound address."""
        ...

    @property
    def stats(self) -> ServerStats:
        """The counters the front keeps."""
        ...

    async def run(self, receiving: trio.CancelScope) -> None:
        """Take work in under ``receiving`` (cancelled when the server shuts
        down), then return once the work taken in is done. The service
        nursery's deadline (the grace period) bounds that work."""
        ...


class Server:
    """A running service, as returned by ``await nursery.start(partial(serve, ...))``.

    Do not create one yourself: :func:`serve`, :func:`serve_connections`
    and :func:`~triocomm.serve_datagrams` make it and hand it over once the
    listeners (or datagram sockets) are bound, so a client may connect as
    soon as ``nursery.start`` returns.

    Stop it with :meth:`shutdown` (graceful) or by cancelling the task that
    runs :func:`serve` (immediate).
    """

    # Set only for a service that accepts no connections (see ServiceFront).
    _front: ServiceFront | None = None
    _body: Body

    def __init__(
        self,
        listeners: list[trio.SocketListener],
        body: Body | ServiceFront,
        options: ServiceOptions,
        unix_path: str | None,
    ) -> None:
        self._listeners = listeners
        self._observers = ObserverSet.of(options.observers)
        if isinstance(body, (RequestLoop, ConnectionBody)):
            if self._observers is not None and self._observers.watches_sessions:
                body = body.observed(self._observers)
            self._body = body
            self._stats = ServerStats()
            self._addresses = [listener.socket.getsockname() for listener in listeners]
        else:
            self._front = body
            self._stats = body.stats
            self._addresses = body.addresses
        # The I/O counters and sessions of the connections closed so far
        # (see ``stats``), and the sessions of serve_connections' handlers.
        self._closed_io = [0, 0, 0, 0, 0]
        self._options = options
        self._max = options.max_connections
        # None unless the service reads PROXY headers or refuses some clients.
        self._admission = (
            None
            if options.admits_all
            else Admission(
                options.proxy_protocol,
                options.allow,
                options.deny,
                options.max_connections_per_ip,
                options.timeouts.first_request,
            )
        )
        self._idle_periods = options.idle
        # Tested once per connection: a service without hooks pays nothing more.
        self._hooked = (
            options.on_connect is not None
            or options.on_close is not None
            or self._observers is not None
        )
        self._unix_path = unix_path
        self._unix_identity = _socket_identity(unix_path) if unix_path else None
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
        # Times the waiting reads and the idle periods of every connection.
        self._timers = Timers()

    # -- public surface ------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (the one the OS chose for port 0).

        A Unix-socket service has none: reading it raises :class:`AttributeError`
        (so ``getattr(server, "port", None)`` is ``None`` there); see
        :attr:`addresses`.
        """
        for address in self._addresses:
            if isinstance(address, tuple):
                return int(address[1])
        raise AttributeError("a Unix-socket service has no port; see Server.addresses")

    @property
    def addresses(self) -> list[Any]:
        """Every bound address: ``(host, port, ...)`` tuples, or the Unix socket path."""
        return list(self._addresses)

    @property
    def stats(self) -> ServerStats:
        """Live :class:`ServerStats` (its I/O sums brought up to date now)."""
        stats = self._stats
        if self._front is not None:
            return stats  # the front keeps them all
        received, sent, messages_in, messages_out, sessions = self._closed_io
        # A copy first: an exporter may read the stats from another thread.
        for entry in tuple(self._entries):
            conn = entry.conn
            if conn is not None:
                io = conn.stats
                received += io.bytes_received
                sent += io.bytes_sent
                messages_in += io.messages_received
                messages_out += io.messages_sent
                sessions += conn.sessions
        stats.bytes_received, stats.bytes_sent = received, sent
        stats.messages_received, stats.messages_sent = messages_in, messages_out
        stats.sessions = sessions
        return stats

    @property
    def connections(self) -> list[Connection[Any, Any]]:
        """A snapshot of the service's open connections (accepted, TLS done), oldest first."""
        found = [entry.conn for entry in self._entries if entry.conn is not None]
        return sorted((conn for conn in found if not conn.is_closed), key=lambda conn: conn.id)

    async def broadcast(self, message: Any) -> int:
        """Send ``message`` to every open connection at once; return how many got it.

        Only for :func:`serve_connections` services: on a :func:`serve`
        service an unsolicited message would desynchronise the replies
        (:class:`RuntimeError`). The message is sent to all connections
        concurrently; each send is bounded by ``ServerTimeouts.send`` (or,
        if that is ``None``, by ``inactivity``) as well as by the
        connection's own limits. A connection that cannot take it in time is
        closed as a slow consumer (logged, counted ``"slow_consumer"``)
        without delaying the others; one that is closing or lost is skipped.
        Nothing is queued: the call returns when every send is done or cut.

        Raises:
            RuntimeError: the service is a :func:`serve` service.
            TypeError (or the codec's own error): the codec refused ``message``;
                nothing was sent.
        """
        if self._body.request_loop:
            raise RuntimeError(
                "broadcast needs a serve_connections service: on a serve service, "
                "an unsolicited message would desynchronise the replies"
            )
        self._options.codec.encode(message)  # refuse it before anything is sent
        timeouts = self._options.timeouts
        limit = timeouts.send if timeouts.send is not None else timeouts.inactivity
        delivered = [0]
        async with trio.open_nursery() as nursery:
            for conn in self.connections:
                nursery.start_soon(self._deliver, conn, message, limit, delivered)
        return delivered[0]

    async def _deliver(
        self, conn: Connection[Any, Any], message: Any, limit: float | None, delivered: list[int]
    ) -> None:
        """One connection's part of :meth:`broadcast`."""
        with trio.move_on_after(math.inf if limit is None else limit):
            try:
                await conn.send(message)
            except CommTimeout:
                pass  # the connection's own send or inactivity limit: a slow consumer
            except (trio.ClosedResourceError, trio.BrokenResourceError, ConnectionLost):
                return  # closing or gone: its own task reports why
            else:
                delivered[0] += 1
                return
        self._stats.errors["slow_consumer"] += 1
        logger.warning(
            "closing connection from %s: slow consumer (a broadcast not taken within %s)",
            conn.peer,
            "its limits" if limit is None else f"{limit:g}s",
        )
        await conn.abort()

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
        (check :attr:`shutting_down` to end early). A datagram service stops
        receiving at once and lets running handlers finish and send their
        replies.

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
            if self._stats.connections_open == 0 and self._front is None:
                self._drained.set()
            self._stop.set()
        await self._done.wait()

    # -- running -------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[Server]) -> None:
        observers = self._observers
        if observers is not None:
            observers.attached(self)
        try:
            with _interrupt_as_itself():
                await self._serve(task_status)
        finally:
            if observers is not None:
                observers.detached(self)
            with trio.CancelScope(shield=True):
                for listener in self._listeners:
                    await trio.aclose_forcefully(listener)
            self._remove_unix_socket()
            self._done.set()

    async def _serve(self, task_status: trio.TaskStatus[Server]) -> None:
        async with trio.open_nursery() as service:
            self._service = service
            # Before the first connection: they time every waiting read.
            await service.start(self._timers.run)
            service.start_soon(self._accept_all if self._front is None else self._run_front)
            task_status.started(self)
            await self._stop.wait()
            await self._drained.wait()
            # Only the timers and idle callbacks can be left now.
            service.cancel_scope.cancel()

    def _remove_unix_socket(self) -> None:
        path = self._unix_path
        # Only unlink the file we made: another service may have replaced it.
        if path is not None and _socket_identity(path) == self._unix_identity:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _run_front(self) -> None:
        assert self._front is not None
        await self._front.run(self._accepting)
        self._drained.set()  # what it took in is done

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
            if stats.connections_open > stats.connections_peak:
                stats.connections_peak = stats.connections_open
            assert self._service is not None
            self._service.start_soon(self._connection_task, stream)

    def _evictable(self) -> _Entry | None:
        """The connection quiet for longest, still waiting between requests; or None.

        Entries passed over leave the list: they woke since they went quiet
        (they come back when they go quiet again), or they wait in the middle
        of a request or are closing (never evictable until a next wait).
        Each went-quiet is dropped at most once, so the looks cost O(1) each,
        amortized.
        """
        keepalive = self._keepalive
        while keepalive:
            entry = next(iter(keepalive))
            conn = entry.conn
            if entry.waiting and not entry.closing and conn and conn.between_messages:
                return entry
            del keepalive[entry]
        return None

    def _went_quiet(self, entry: _Entry) -> None:
        # The entry's connection waits for its next request: evictable, in this order.
        keepalive = self._keepalive
        keepalive[entry] = None
        keepalive.move_to_end(entry)
        if self._parked:  # _wake_acceptors, written out: once per wait of every connection
            self._room.unpark_all()

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
        if entry.waiting and conn is not None and conn.between_messages:
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
        admission = self._admission
        arrival: Arrival | None = None
        try:
            if admission is not None:
                arrival = await self._arrive(admission, stream)
                if arrival is None:
                    return
            transport: trio.abc.Stream = stream
            if self._options.tcp_keepalive is not None:
                with contextlib.suppress(OSError):  # the peer may be gone already
                    set_tcp_keepalive(stream, self._options.tcp_keepalive)
            if self._options.ssl_context is not None:
                secure = await self._handshake(stream, _peer_of(stream, arrival))
                if secure is None:
                    return
                transport = secure
            conn: Connection[Any, Any] = Connection(transport, self._options.codec)
            conn._attach(
                self._timers,
                on_wait=entry.went_quiet,
                request_loop=self._body.request_loop,
                proxied=_proxied(arrival),
            )
            entry.conn = conn
            if _SHUT_RD_WAKES_READERS:
                entry.sock = socket_of(transport)
            self._start_idle_detection(entry)
            # The on_connect point: from here on, on_close follows the close
            # exactly once, whatever ends the connection. Inline, not a
            # function: a waiting connection's frames are memory per connection.
            hooked = self._hooked
            error: BaseException | None = None
            try:
                if hooked:
                    await self._opened(conn)
                if not conn.is_closed:  # on_connect may reject the peer by closing it
                    await self._body(self, conn, entry)
            except Exception as exc:
                if entry.closing and isinstance(exc, trio.BrokenResourceError):
                    pass  # TLS reports the read side we shut as a ragged EOF
                elif self._report(conn, exc):
                    error = _cause(exc)
                    await conn.abort()  # failed: ERROR, like a connection error
            except BaseException as exc:
                # Cancelled (or interrupted): routine while it waited for a request.
                body = self._body
                if not (conn.between_messages and (not body.request_loop or _waiting(conn))):
                    error = exc
                raise
            finally:
                if entry.idle_callback is not None:
                    entry.idle_callback.cancel()
                try:
                    with trio.move_on_after(_CLOSE_LIMIT):
                        await conn.aclose()
                finally:
                    if hooked:
                        self._closed(conn, error)
        finally:
            if arrival is not None:
                assert admission is not None
                admission.leave(arrival)
            self._forget(entry)

    async def _opened(self, conn: Connection[Any, Any]) -> None:
        """The ``on_connect`` point: the connection exists and may be greeted."""
        if self._observers is not None:
            self._observers.connection_opened(conn)
        on_connect = self._options.on_connect
        if on_connect is None:
            return
        first, _ = passive_limits(self._options.timeouts)
        _enter(conn, ConnState.CONNECTED, first)
        try:
            await on_connect(conn)
        except Exception as exc:
            if _from_connection(conn, exc) or (
                isinstance(exc, (trio.ClosedResourceError, trio.EndOfChannel))
            ):
                raise  # the connection's own end: reported as such
            raise _HookFailed(exc) from exc

    def _closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        """After the close: ``on_close``, whose exceptions are logged and swallowed."""
        on_close = self._options.on_close
        if on_close is not None:
            try:
                on_close(conn, error)
            except Exception as exc:
                logger.error(
                    "on_close for the connection from %s raised %r", conn.peer, exc, exc_info=exc
                )
        if self._observers is not None:
            self._observers.connection_closed(conn, error)

    async def _arrive(self, admission: Admission, stream: trio.abc.Stream) -> Arrival | None:
        """Learn who a new connection is from and admit it, or close it and say None.

        The one place a connection is looked at before its TLS handshake and
        its first message: the PROXY header (within ``first_request`` of the
        accept), then ``allow``/``deny`` and ``max_connections_per_ip``.
        """
        assert isinstance(stream, trio.SocketStream)
        try:
            return await admission.arrive(stream, trio.current_time())
        except Refused as refusal:
            self._stats.errors[refusal.kind] += 1
            log = logger.warning if refusal.kind == "proxy_protocol" else logger.info
            log("closing connection from %s: %s", _peer_of(stream), refusal)
        await trio.aclose_forcefully(stream)
        return None

    def _session_started(self) -> None:
        """A serve_connections handler has its connection: one session, counted in ``stats``."""
        self._closed_io[4] += 1

    def _forget(self, entry: _Entry) -> None:
        stats = self._stats
        if entry.conn is not None:
            io, closed = entry.conn.stats, self._closed_io
            closed[0] += io.bytes_received
            closed[1] += io.bytes_sent
            closed[2] += io.messages_received
            closed[3] += io.messages_sent
            closed[4] += entry.conn.sessions
        stats.connections_open -= 1
        self._entries.discard(entry)
        self._keepalive.pop(entry, None)
        self._timers.disarm(entry)
        entry.conn = None
        self._wake_acceptors()
        if self._draining and stats.connections_open == 0:
            self._drained.set()

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> trio.SSLStream[Any] | None:
        ssl_stream = trio.SSLStream(stream, self._options.ssl_context, server_side=True)
        limit = self._options.timeouts.handshake
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
        if isinstance(exc, _HookFailed):
            errors["on_connect"] += 1
            logger.error(
                "closing connection from %s: on_connect raised %r",
                peer,
                exc.error,
                exc_info=exc.error,
            )
        elif isinstance(exc, SessionFailed):
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
            unit = " bytes/s" if exc.phase.endswith("_rate") else "s"
            logger.warning(
                "closing connection from %s: %s timeout (limit %g%s)",
                peer,
                exc.phase,
                exc.limit,
                unit,
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

    def _start_idle_detection(self, entry: _Entry) -> None:
        periods = self._idle_periods
        if periods:
            entry.idle_fired = {}
            entry.idle_due = []
            self._timers.arm(entry, trio.current_time() + min(periods.values()))

    def _check_idle(self, entry: _Entry, conn: Connection[Any, Any], now: float) -> float:
        """Call ``on_idle`` for each status idle for its period; return when to look next.

        The real idle time is checked only when a period could have ended, so
        the cost is per idle period, never per read or write. One callback
        task per connection at a time: statuses that come due meanwhile wait
        for it, each at most once, so a slow callback skips beats instead of
        piling them up.
        """
        fired, waiting = entry.idle_fired, entry.idle_due
        assert fired is not None
        assert waiting is not None
        due_now, following = idle_statuses_due(conn, self._idle_periods, fired, now)
        for status in due_now:
            if entry.idle_callback is None and self._service is not None:
                entry.idle_callback = trio.CancelScope()
                self._service.start_soon(self._call_on_idle, entry, conn, status)
            elif status not in waiting:
                waiting.append(status)
        return following

    async def _call_on_idle(self, entry: _Entry, conn: Connection[Any, Any], status: Idle) -> None:
        scope, waiting = entry.idle_callback, entry.idle_due
        assert scope is not None
        assert waiting is not None
        on_idle = self._options.on_idle
        assert on_idle is not None
        try:
            called = call_on_idle(
                conn, on_idle, status, waiting, scope, lambda: entry.conn is conn, logger
            )
            if not await called:  # it raised: logged, and the connection closed
                self._stats.errors["on_idle"] += 1
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


class RequestLoop:
    """The body of a :func:`serve` connection: read requests, answer them in order.

    The hot loop of the service: one task per connection, no task or cancel
    scope per request. A read that brought several requests leaves them
    decoded in the connection; they are answered in order without further
    I/O, their replies accepted into the connection's outbox and written in
    one write when the burst is done or the outbox is full (bounded in count
    and bytes). Nothing is read while replies are unwritten, so read-ahead is
    bounded by one read plus one unfinished request (the codec's bound), and a
    client that never reads is held back by TCP.
    """

    request_loop = True

    def __init__(self, handler: RequestHandler[Any, Any]) -> None:
        self.handler = handler

    def observed(self, observers: ObserverSet) -> RequestLoop:
        """This loop with each request reported to ``observers`` as a session."""
        return RequestLoop(_observed(self.handler, observers))

    async def __call__(self, server: Server, conn: Connection[Any, Any], entry: _Entry) -> None:
        # Locals, not attributes: a connection waiting for its next request
        # holds this frame, and what it refers to is memory per idle connection.
        handler = self.handler
        limits, keepalive = passive_limits(server._options.timeouts)
        conn._set_state(ConnState.CONNECTED, limits)
        between = False  # the first wait is for the first request
        while True:
            # Wait for the next request: the only place a connection is idle.
            if not entry.begin_wait(conn, between):
                return
            try:
                if entry.sock is not None:
                    # _end_wait shuts the read side to end this wait: a
                    # request that had already arrived is still returned.
                    request = await conn.receive()
                else:
                    with entry.wait_scope() as scope:
                        request = await conn.receive()
                    if scope.cancelled_caught:
                        return
            except trio.EndOfChannel:
                return
            between = True
            # Answer it and the requests that came with it, write the
            # replies, and leave the connection in KEEPALIVE.
            await conn._answer(handler, request, keepalive)
            # The round's schedule point, which its read skipped when it
            # found data (so a client streaming requests, with or without
            # replies, cannot keep this task running); made here, in the
            # outermost frame, it suspends and resumes no other.
            await trio.lowlevel.cancel_shielded_checkpoint()
            # A keep-alive connection may wait for minutes, and what its
            # frame holds is held per idle connection.
            del request


def _waiting(conn: Connection[Any, Any]) -> bool:
    """Is a request loop's connection between requests (see _Entry.waiting)?"""
    return conn.state in (ConnState.CONNECTED, ConnState.KEEPALIVE)


def _enter(conn: Connection[Any, Any], state: ConnState, limits: Limits) -> None:
    """Set a connection's state and limits outside the request loop's hot path."""
    conn._set_state(state, limits)


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


class ConnectionBody:
    """The body of a :func:`serve_connections` connection: the handler owns it."""

    request_loop = False

    def __init__(self, handler: ConnectionHandler[Any, Any]) -> None:
        self.handler = handler

    def observed(self, observers: ObserverSet) -> ConnectionBody:
        """This body with the connection reported to ``observers`` as a session."""
        return ConnectionBody(_observed(self.handler, observers))

    async def __call__(self, server: Server, conn: Connection[Any, Any], entry: _Entry) -> None:
        # The handler decides when to read, so every wait for a message is a
        # wait between messages: keepalive bounds it.
        _, keepalive = passive_limits(server._options.timeouts)
        _enter(conn, ConnState.RECEIVING, keepalive)
        server._session_started()
        await self.handler(conn)
        # Closed straight after, before any other task runs: SUCCESS, which
        # no one could see, is not written (see ConnState).


Body = RequestLoop | ConnectionBody

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _observed(handler: F, observers: ObserverSet) -> F:
    """``handler`` (of either body; the connection is its last argument), reporting
    each call to ``observers`` as a session. Only made when an observer watches
    sessions, so a service without one runs the user's handler as it is."""
    return observers.watch_handler(handler)


# -- entry points ------------------------------------------------------------


async def run_service(
    body: Body | ServiceFront,
    options: ServiceOptions,
    task_status: trio.TaskStatus[Server],
    *,
    port: int | None = None,
    host: str | bytes | None = None,
    path: str | os.PathLike[str] | None = None,
    listeners: list[trio.SocketListener] | None = None,
) -> None:
    """Bind (or take ``listeners``, e.g. serve_workers' SO_REUSEPORT ones) and serve.

    A ``body`` that is a :class:`ServiceFront` brings its own sockets: pass
    ``listeners=[]``.
    """
    if listeners is None:
        listeners = await _open_listeners(port, host, path)
    try:
        server = Server(listeners, body, options, os.fspath(path) if path is not None else None)
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    await server._run(task_status)


def _where(
    port: int | None,
    host: str | bytes | None,
    path: str | os.PathLike[str] | None,
    listeners: Iterable[trio.SocketListener | socket.socket] | None,
) -> dict[str, Any]:
    """Where a service listens, as ``run_service`` takes it: an address, or the caller's sockets.

    Every given socket is checked before the service takes any of them, so
    a bad one leaves the caller's sockets open and still the caller's.
    """
    if listeners is None:
        return {"port": port, "host": host, "path": path}
    if port is not None or host is not None or path is not None:
        raise TypeError("listeners= serves on the given sockets: leave out port, host and path")
    if isinstance(listeners, (trio.SocketListener, socket.socket)):
        raise TypeError("listeners must be a list of listeners, e.g. listeners=[sock]")
    given = list(listeners)
    if not given:
        raise ValueError("listeners= needs at least one listening socket")
    for listener in given:
        _check_listening(listener)
    return {"listeners": [_as_listener(listener) for listener in given]}


def _check_listening(listener: object) -> None:
    if isinstance(listener, trio.SocketListener):
        return  # trio checked it when it was made
    if not isinstance(listener, socket.socket):
        raise TypeError(
            f"listeners: {listener!r} is neither a trio.SocketListener nor a socket.socket"
        )
    if listener.type != socket.SOCK_STREAM:
        raise ValueError(f"listeners: {listener!r} is not a stream (SOCK_STREAM) socket")
    if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValueError(f"listeners: {listener!r} is not listening (call listen() first)")


def _as_listener(listener: trio.SocketListener | socket.socket) -> trio.SocketListener:
    if isinstance(listener, trio.SocketListener):
        return listener
    return trio.SocketListener(trio.socket.from_stdlib_socket(listener))


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
    tcp_keepalive: float | None = None,
    proxy_protocol: bool = False,
    allow: Iterable[str | Network | IPAddress] | None = None,
    deny: Iterable[str | Network | IPAddress] | None = None,
    max_connections_per_ip: int | None = None,
    listeners: Iterable[trio.SocketListener | socket.socket] | None = None,
    on_connect: ConnectHook | None = None,
    on_close: CloseHook | None = None,
    observers: Iterable[Observer] | None = None,
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
    handler, port, codec=...))``: the listeners are then bound, and the
    :class:`Server` gives the port, the stats and :meth:`Server.shutdown`.

    Args:
        handler: ``async def handler(request, conn) -> reply | None``.
        port: TCP port; 0 asks the OS for a free one (see ``Server.port``).
        host: address to bind; ``None``: every interface (IPv4 and IPv6).
        path: serve on this Unix socket path instead of a port (a stale socket
            file is replaced; the file is removed when the service ends).
        codec: the wire format of requests and replies.
        ssl_context: serve TLS (each handshake bounded by ``timeouts.handshake``).
        timeouts: a :class:`ServerTimeouts`; the defaults when ``None``.
        max_connections: at most this many open connections. At the limit, a
            new client evicts the longest-idle keep-alive connection; if none
            is idle, accepting pauses until a connection closes.
        idle: idle periods, e.g. ``{Idle.READ: 30.0}``: ``on_idle`` is called
            when a connection was idle that long, and every period after.
        on_idle: ``async def on_idle(conn, status)``, e.g. a heartbeat; a
            connection has at most one running, and a slow one delays no other.
        tcp_keepalive: seconds of silence before the kernel probes an accepted
            TCP connection (as ``Target(tcp_keepalive=)``); ``None``: untouched.
        proxy_protocol: connections start with a PROXY header (v1, v2): see
            ``conn.remote_address`` and ``conn.proxied_by``.
        allow, deny, max_connections_per_ip: who may connect, how many at once.
        listeners: listening sockets to serve on (e.g. from systemd), not ``port``.
        on_connect, on_close, observers: ``async def on_connect(conn)`` before
            the first request, ``def on_close(conn, error)`` once after the
            close, :class:`Observer` objects (see "Observing a service").

    Failures are isolated: a handler exception, bad input, an oversized frame,
    a timeout, a failed TLS handshake or a refused client closes that one
    connection, logs one line on the ``triocomm.server`` logger naming the
    peer and the cause, and counts in ``Server.stats.errors``. Accept failures
    for lack of descriptors or memory make the service wait 0.1 s and retry.

    Raises:
        ValueError, TypeError: bad options (before anything is bound).
        OSError: the address cannot be bound.
    """
    edge = (proxy_protocol, allow, deny, max_connections_per_ip)
    hooks = (on_connect, on_close, observers)
    options = ServiceOptions.build(
        codec, ssl_context, timeouts, max_connections, idle, on_idle, tcp_keepalive, *edge, *hooks
    )
    await run_service(
        RequestLoop(handler), options, task_status, **_where(port, host, path, listeners)
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
    tcp_keepalive: float | None = None,
    proxy_protocol: bool = False,
    allow: Iterable[str | Network | IPAddress] | None = None,
    deny: Iterable[str | Network | IPAddress] | None = None,
    max_connections_per_ip: int | None = None,
    listeners: Iterable[trio.SocketListener | socket.socket] | None = None,
    on_connect: ConnectHook | None = None,
    on_close: CloseHook | None = None,
    observers: Iterable[Observer] | None = None,
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

    ``on_connect`` runs before the handler, ``on_close`` after the
    connection is closed, as with :func:`serve`; for ``observers`` the whole
    connection is one session.

    A handler exception closes only its connection (logged, counted as
    ``"handler"``). If the peer closes cleanly, ``receive`` raises
    :class:`trio.EndOfChannel`; letting it escape the handler is fine.
    """
    edge = (proxy_protocol, allow, deny, max_connections_per_ip)
    hooks = (on_connect, on_close, observers)
    options = ServiceOptions.build(
        codec, ssl_context, timeouts, max_connections, idle, on_idle, tcp_keepalive, *edge, *hooks
    )
    await run_service(
        ConnectionBody(handler), options, task_status, **_where(port, host, path, listeners)
    )
