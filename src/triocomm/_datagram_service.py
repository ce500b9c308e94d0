"""Datagram services: :func:`serve_datagrams` and the :class:`DatagramPeer` handle.

A datagram service binds UDP sockets and calls ``handler(request, peer)`` for
every datagram that holds exactly one message; a reply goes back as one
datagram from the socket the request came in on. It runs as a
:class:`Server` (through its :class:`ServiceFront` seam), so it reports
:class:`ServerStats` and shuts down like the stream services.

How a datagram travels: each socket has one receive loop that reads what the
kernel holds (a bounded batch per schedule point), decodes it, and hands it
to a worker task. Workers are tasks of the service kept between datagrams:
an idle one is woken (no task created per datagram), a new one is started
only when none is idle, and at most ``max_in_flight`` are busy; a datagram
arriving beyond that is dropped and counted, never queued, so a flood costs
no memory. This layer never sees a connection: there is none.

Observers see each handled datagram as a session of its :class:`DatagramPeer`
(no connection events). A worker picks its handling method once, when it
starts: without an observer of sessions a datagram pays nothing for them.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from ._connection import format_address
from ._datagram import MAX_DATAGRAM, check_max_datagram, decode_datagram, encode_datagram
from ._errors import ProtocolError
from ._framing import Buffer, Codec
from ._observe import Observer, ObserverSet
from ._server import Server, ServerStats, ServiceOptions, run_service

__all__ = ["DatagramPeer", "serve_datagrams"]

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("triocomm.server")

DatagramHandler = Callable[[In, "DatagramPeer[Out]"], Awaitable[Out | None]]

# Datagrams read per schedule point while the kernel has more: enough to
# amortise the trip through the scheduler, few enough that a flood on one
# socket does not starve the handlers or the other sockets.
_BATCH = 64
# Idle workers kept between bursts (a worker beyond them ends when done).
_IDLE_KEPT = 64
# Errors that a burst of bad traffic can repeat thousands of times a second
# are logged at most once a second per kind (the counters count them all).
_LOG_INTERVAL = 1.0
# recvfrom on an unconnected socket can report an earlier send's ICMP error
# (Windows does); it concerns that one peer, not the socket.
_PEER_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH})


class DatagramPeer(Generic[Out]):
    """The sender of one datagram, as a datagram service's handler sees it.

    ``handler(request, peer)`` gets one per datagram. Its return value is the
    reply; :meth:`send` sends further datagrams to the same peer from the
    same socket (a stream of results, a late notification).
    """

    __slots__ = ("_codec", "_max_datagram", "_remote", "_sock")

    def __init__(
        self,
        sock: socket.socket,
        remote_address: Any,
        codec: Codec[Any, Out],
        max_datagram: int,
    ) -> None:
        self._sock = sock
        self._codec = codec
        self._max_datagram = max_datagram
        self._remote = remote_address

    @property
    def remote_address(self) -> Any:
        """The sender's address as the socket reports it: ``(host, port)``, or
        ``(host, port, flowinfo, scope_id)`` over IPv6."""
        return self._remote

    @property
    def local_address(self) -> Any:
        """The address of the socket the datagram came in on (the service's bound address)."""
        return self._sock.getsockname()

    async def send(self, message: Out) -> None:
        """Send ``message`` to this peer as one datagram (a checkpoint).

        Raises:
            ValueError: it encodes to more than the service's ``max_datagram``.
            TypeError, ...: the codec refused it (its own exception).
            OSError: the kernel refused the datagram (e.g. no route).
        """
        data = encode_datagram(self._codec, message, self._max_datagram)
        await trio.lowlevel.checkpoint_if_cancelled()
        await send_to(self._sock, data, self._remote)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def __repr__(self) -> str:
        return f"<DatagramPeer {format_address(self._remote)}>"


async def send_to(sock: socket.socket, data: Buffer, address: Any) -> None:
    """Hand one datagram to the kernel, waiting for room in the rare case it has none.

    No checkpoint when the kernel takes it at once: a worker's reply is the
    last thing it does before it waits for the next datagram.
    """
    while True:
        try:
            sock.sendto(data, address)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


@dataclass(frozen=True)
class DatagramOptions(Generic[In, Out]):
    """The options of a datagram service, checked once."""

    handler: DatagramHandler[In, Out]
    codec: Codec[In, Out]
    max_datagram: int = MAX_DATAGRAM
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        if not callable(self.handler):
            raise TypeError(f"handler must be an async function, got {self.handler!r}")
        check_max_datagram(self.max_datagram)
        limit = self.max_in_flight
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"max_in_flight must be an int, got {limit!r}")
        if limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {limit}")


class _LogLimit:
    """Log a kind of error at most once per ``_LOG_INTERVAL``, naming how many were not logged."""

    __slots__ = ("_next", "_quiet")

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._quiet: collections.Counter[str] = collections.Counter()

    def allows(self, kind: str) -> str | None:
        """``None``: stay quiet; else a suffix for the log line (how many were skipped)."""
        now = trio.current_time()
        if now < self._next.get(kind, -math.inf):
            self._quiet[kind] += 1
            return None
        self._next[kind] = now + _LOG_INTERVAL
        skipped = self._quiet.pop(kind, 0)
        return f" ({skipped} more since the last report)" if skipped else ""


# A decoded datagram waiting for a worker: the socket, the message, the sender.
_Work = tuple[socket.socket, Any, Any]


class DatagramFront:
    """The work of a datagram service: receive loops and workers (a ``ServiceFront``).

    It owns its sockets' reading, its workers and its :class:`ServerStats`;
    the :class:`Server` made from it reads them and cancels ``receiving`` to
    stop it.
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        options: DatagramOptions[Any, Any],
        observers: ObserverSet | None = None,
    ) -> None:
        self._sockets = sockets
        self._options = options
        # Only observers of sessions hear of datagrams (there are no connections).
        watched = observers is not None and observers.watches_sessions
        self._observers = observers if watched else None
        self._addresses = [sock.getsockname() for sock in sockets]
        self._stats = ServerStats()
        self._log = _LogLimit()
        self._nursery: trio.Nursery | None = None
        # Workers handling a datagram now (at most max_in_flight).
        self._busy = 0
        # Idle workers park here; a datagram for one waits in _work meanwhile.
        self._idle = trio.lowlevel.ParkingLot()
        self._work: collections.deque[_Work] = collections.deque()
        self._stopping = False

    @property
    def addresses(self) -> list[Any]:
        """Every bound address."""
        return self._addresses

    @property
    def stats(self) -> ServerStats:
        """The service's counters."""
        return self._stats

    @property
    def in_flight(self) -> int:
        """Datagrams being handled now."""
        return self._busy

    async def run(self, receiving: trio.CancelScope) -> None:
        """Receive until ``receiving`` is cancelled, then let the running handlers finish."""
        async with trio.open_nursery() as workers:
            self._nursery = workers
            with receiving:
                async with trio.open_nursery() as receivers:
                    for sock in self._sockets:
                        receivers.start_soon(self._receive_loop, sock)
            # Stopped receiving: idle workers leave, busy ones finish their datagram.
            self._stopping = True
            self._idle.unpark_all()

    async def _receive_loop(self, sock: socket.socket) -> None:
        buffer = bytearray(self._options.max_datagram + 1)
        view = memoryview(buffer)
        while True:
            for _ in range(_BATCH):
                try:
                    size, address = sock.recvfrom_into(buffer)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _PEER_ERRNOS:
                        continue
                    raise
                self._take(sock, view, size, address)
            else:
                # The kernel holds more: let the workers run first.
                await trio.lowlevel.checkpoint()
                continue
            await trio.lowlevel.wait_readable(sock)

    def _take(self, sock: socket.socket, view: memoryview, size: int, address: Any) -> None:
        """Check a datagram that arrived and hand it to a worker, or drop and count it.

        It is copied out of the socket's buffer only once it is taken: a
        flood that is dropped costs no allocation per datagram.
        """
        options = self._options
        if size > options.max_datagram:
            self._drop("protocol", address, f"larger than max_datagram={options.max_datagram}")
            return
        if self._busy >= options.max_in_flight:
            self._drop("overload", address, f"max_in_flight={options.max_in_flight} busy")
            return
        try:
            request = decode_datagram(options.codec, bytes(view[:size]))
        except ProtocolError as exc:
            self._drop("protocol", address, str(exc))
            return
        self._busy += 1
        work = (sock, request, address)
        if self._idle:
            self._work.append(work)
            self._idle.unpark()
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._worker, work)

    def _drop(self, kind: str, address: Any, why: str) -> None:
        self._stats.errors[kind] += 1
        suffix = self._log.allows(kind)
        if suffix is not None:
            logger.warning("dropped a datagram from %s: %s%s", format_address(address), why, suffix)

    async def _worker(self, work: _Work) -> None:
        idle = self._idle
        handle = self._handle if self._observers is None else self._handle_observed
        options = self._options
        codec, max_datagram = options.codec, options.max_datagram
        while True:
            sock, request, address = work
            peer = DatagramPeer(sock, address, codec, max_datagram)
            try:
                await handle(sock, request, address, peer)
            finally:
                self._busy -= 1
            del work, request, peer  # an idle worker holds no request
            if self._stopping or len(idle) >= _IDLE_KEPT:
                return
            await idle.park()
            if not self._work:
                return  # woken to leave: the service stopped receiving
            work = self._work.popleft()

    async def _handle(
        self, sock: socket.socket, request: Any, address: Any, peer: DatagramPeer[Any]
    ) -> Exception | None:
        """Call the handler and send its reply; what failed (counted and logged), or ``None``."""
        options = self._options
        self._stats.sessions += 1
        try:
            reply = await options.handler(request, peer)
            if reply is None:
                return None
            data = encode_datagram(options.codec, reply, options.max_datagram)
        except Exception as exc:
            self._failed("handler", address, "the handler raised", exc)
            return exc
        try:
            await send_to(sock, data, address)
        except OSError as exc:
            self._failed("send", address, "the reply could not be sent", exc)
            return exc
        return None

    async def _handle_observed(
        self, sock: socket.socket, request: Any, address: Any, peer: DatagramPeer[Any]
    ) -> None:
        """:meth:`_handle`, reported to the observers as a session of ``peer``
        that ends once the reply is sent (or the handler was cancelled)."""
        observers = self._observers
        assert observers is not None
        started = observers.session_started(peer)
        try:
            error = await self._handle(sock, request, address, peer)
        except BaseException as exc:  # cancelled when the grace period ran out
            observers.session_ended(peer, exc, started)
            raise
        observers.session_ended(peer, error, started)

    def _failed(self, kind: str, address: Any, what: str, exc: Exception) -> None:
        self._stats.errors[kind] += 1
        suffix = self._log.allows(kind)
        if suffix is not None:
            logger.error(
                "datagram from %s: %s: %r%s",
                format_address(address),
                what,
                exc,
                suffix,
                exc_info=exc,
            )


# -- binding -------------------------------------------------------------------


async def _bind(port: int, host: str | bytes | None) -> list[socket.socket]:
    """Bind one non-blocking UDP socket per address ``host`` resolves to.

    With port 0 every socket gets the port the first one was given, so that
    an IPv4 and an IPv6 socket of one service share it.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if any(s.family == family and s.getsockname()[0] == address[0] for s in sockets):
                continue  # getaddrinfo may repeat an address (once per protocol)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:
                    continue  # a system without IPv6 (or IPv4), as trio's listeners skip it
                raise
            sockets.append(sock)
            if family == socket.AF_INET6:
                # One socket per family, as trio.open_tcp_listeners does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sockets[0] is not sock:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EAFNOSUPPORT, f"no address family of {host!r} is supported here")
    return sockets


async def serve_datagrams(
    handler: DatagramHandler[In, Out],
    port: int,
    *,
    host: str | bytes | None = None,
    codec: Codec[In, Out],
    max_datagram: int = MAX_DATAGRAM,
    max_in_flight: int = 1024,
    observers: Iterable[Observer] | None = None,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a datagram (UDP) service until it is shut down or cancelled.

    Every datagram that holds exactly one message is a session:
    ``await handler(request, peer)`` returns the reply, sent back as one
    datagram from the socket the request came in on, or ``None`` to send
    nothing. ``peer`` is a :class:`DatagramPeer` (the sender's address, and
    :meth:`~DatagramPeer.send` for further datagrams). Handlers run
    concurrently, each in a task of the service.

    Start it with ``server = await nursery.start(functools.partial(
    serve_datagrams, handler, port, codec=...))``: the sockets are bound when
    ``start`` returns; the :class:`Server` gives the port, the stats
    (``sessions`` counts the datagrams handled) and :meth:`Server.shutdown`
    (stop receiving at once, let running handlers finish and send their
    replies, cancel what is left when the grace period runs out).

    Args:
        handler: ``async def handler(request, peer) -> reply | None``.
        port: UDP port; 0 asks the OS for a free one (every bound address
            then shares it).
        host: address to bind; ``None`` binds every interface (IPv4 and IPv6).
        codec: the wire format; one datagram is one message.
        max_datagram: the largest datagram taken or sent, in bytes (default
            65,507, the most IPv4 carries). A larger datagram is dropped; a
            reply that encodes larger is counted as a handler error.
        max_in_flight: the most handlers running at once. A datagram arriving
            while that many run is dropped, not queued: a flood costs no
            memory, and the sender retries as UDP senders do.
        observers: :class:`Observer` objects. Each handled datagram is a
            session: ``session_started(peer)`` before the handler,
            ``session_ended(peer, error, duration)`` once the reply is sent
            (``error``: what was counted in ``stats.errors``, or ``None``),
            ``peer`` being the :class:`DatagramPeer`; ``attached`` and
            ``detached`` as for :func:`serve`. There are no connection
            events.

    Failures never stop the service. What is dropped or fails is counted in
    ``Server.stats.errors`` and logged on the ``triocomm.server`` logger
    (at most once a second per kind): ``"protocol"`` (oversized, or not
    exactly one message), ``"overload"`` (beyond ``max_in_flight``),
    ``"handler"`` (the handler raised, or its reply could not be encoded into
    one datagram) and ``"send"`` (the kernel refused the reply).

    Raises:
        ValueError, TypeError: bad options (before anything is bound).
        OSError: the address cannot be bound.
    """
    options = DatagramOptions(handler, codec, max_datagram, max_in_flight)
    service = ServiceOptions.build(codec, observers=observers)
    sockets = await _bind(port, host)
    try:
        front = DatagramFront(sockets, options, ObserverSet.of(service.observers))
        await run_service(front, service, task_status, listeners=[])
    finally:
        for sock in sockets:
            sock.close()
