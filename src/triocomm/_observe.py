"""Observers: plain functions that watch the connections and sessions of clients and services.

An :class:`Observer` subclass overrides the events it cares about; the others
do nothing. A client or a service given ``observers=[...]`` holds them in one
:class:`ObserverSet`, which calls, for each event, only the observers that
override it, and logs and swallows what they raise: an observer can never
break a connection. With no observers there is no set at all (``None``), so
the client and the service test one attribute per connection event and pay
nothing per request (a service's sessions are watched by wrapping its handler
only when an observer watches sessions).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from ._connection import format_address

if TYPE_CHECKING:
    from ._connection import Connection

__all__ = ["ObservedPeer", "Observer", "ObserverSet"]

logger = logging.getLogger("triocomm.observe")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_EVENTS = (
    "attached",
    "detached",
    "connection_opened",
    "connection_closed",
    "connect_failed",
    "session_started",
    "session_ended",
    "pool_wait",
    "retry",
)


class ObservedPeer(Protocol):
    """What a session event names: a :class:`Connection`, or on a datagram
    service the :class:`DatagramPeer` of the datagram handled.

    Both have the two addresses below; test ``isinstance(conn,
    triocomm.Connection)`` before using what only a connection has
    (``seq``, ``stats``, ``id``).
    """

    @property
    def remote_address(self) -> object:
        """The peer's address."""

    @property
    def local_address(self) -> object:
        """This end's address."""


class Observer:
    """Watches a client's or a service's connections and sessions; subclass it.

    Pass instances as ``observers=[...]`` to :func:`open_client`,
    :func:`serve`, :func:`serve_connections`, :func:`serve_workers` or
    :func:`serve_datagrams` (which has no connections: each datagram it
    handles is a session, with its :class:`DatagramPeer` as ``conn``).
    Every method does nothing unless overridden. They are plain functions,
    called in the task where the event happens and never awaited, so keep
    them quick (count, record, hand over to a channel). An exception from
    one is logged on the ``triocomm.observe`` logger, naming the peer, and
    swallowed. ``error`` is ``None`` where a connection or a session ended
    routinely, else the exception that ended it. Durations are seconds on
    the Trio clock.

    One observer may watch several clients and services at once:
    :meth:`attached` and :meth:`detached` say which.
    """

    def attached(self, source: object) -> None:
        """A :class:`Server` started, or a :class:`Client` opened, with this observer."""

    def detached(self, source: object) -> None:
        """That server or client has stopped; no more events come from it."""

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        """A connection is established (client: after connect and TLS;
        service: after accept and TLS, just before ``on_connect``)."""

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        """A connection opened above is closed (a service: after ``on_close``;
        a client: ``error`` is also what failed in the target's ``on_connect``
        or health check, when that closed it)."""

    def connect_failed(self, address: tuple[str, int] | str, error: BaseException) -> None:
        """Client: a connect attempt failed; ``address`` is ``(host, port)`` or a Unix path."""

    def session_started(self, conn: ObservedPeer) -> None:
        """A session begins: client ``request``, ``run`` or ``connection``;
        service: a request handed to the handler, or a connection to a
        connection handler; datagram service: a datagram handed to the
        handler, ``conn`` being its :class:`DatagramPeer`."""

    def session_ended(
        self, conn: ObservedPeer, error: BaseException | None, duration: float
    ) -> None:
        """That session ended after ``duration`` seconds (a service: when its
        handler returned; a datagram service: once the reply is sent)."""

    def pool_wait(self, target: Any, duration: float) -> None:
        """Client: a session waited ``duration`` seconds for a pool slot of ``target``."""

    def retry(self, target: Any, attempt: int, error: BaseException) -> None:
        """Client: a session is tried again after ``error``; ``attempt`` is the
        number of the attempt about to start (2 for the first retry)."""


class ObserverSet:
    """The observers of one client or service, called as one; made by :meth:`of`.

    Each event method calls only the observers whose class overrides it, in
    the order given, and logs and swallows their exceptions.
    """

    __slots__ = ("_calls", "_session_ended", "_session_started", "observers", "watches_sessions")

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers
        self._calls: dict[str, list[Callable[..., object]]] = {
            event: [
                getattr(observer, event)
                for observer in observers
                if getattr(type(observer), event) is not getattr(Observer, event)
            ]
            for event in _EVENTS
        }
        # The per-session events, looked up once: they run for every request.
        self._session_started = self._calls["session_started"]
        self._session_ended = self._calls["session_ended"]
        # Services wrap their handler only for observers that watch sessions.
        self.watches_sessions = bool(self._session_started or self._session_ended)

    @classmethod
    def of(cls, observers: Iterable[Observer] | None) -> ObserverSet | None:
        """The set of ``observers``, or ``None`` when there are none (checked)."""
        found = check_observers(observers)
        return cls(found) if found else None

    def _call(
        self, calls: list[Callable[..., object]], event: str, subject: object, *args: object
    ) -> None:
        for call in calls:
            try:
                call(*args)
            except Exception as exc:
                _report(call, event, subject, exc)

    def attached(self, source: object) -> None:
        """Tell every observer that ``source`` (a server or client) started."""
        self._call(self._calls["attached"], "attached", source, source)

    def detached(self, source: object) -> None:
        """Tell every observer that ``source`` stopped."""
        self._call(self._calls["detached"], "detached", source, source)

    def connection_opened(self, conn: Connection[Any, Any]) -> None:
        """See :meth:`Observer.connection_opened`."""
        self._call(self._calls["connection_opened"], "connection_opened", conn, conn)

    def connection_closed(self, conn: Connection[Any, Any], error: BaseException | None) -> None:
        """See :meth:`Observer.connection_closed`."""
        self._call(self._calls["connection_closed"], "connection_closed", conn, conn, error)

    def connect_failed(self, address: tuple[str, int] | str, error: BaseException) -> None:
        """See :meth:`Observer.connect_failed`."""
        calls = self._calls["connect_failed"]
        self._call(calls, "connect_failed", format_address(address), address, error)

    def session_started(self, conn: object) -> float:
        """See :meth:`Observer.session_started` (``conn``: a :class:`Connection`, or a
        datagram service's ``DatagramPeer``); returns the start for :meth:`session_ended`."""
        if self._session_started:
            self._call(self._session_started, "session_started", conn, conn)
        return trio.current_time()

    def session_ended(self, conn: object, error: BaseException | None, started: float) -> None:
        """See :meth:`Observer.session_ended`; ``started`` from :meth:`session_started`."""
        if self._session_ended:
            duration = trio.current_time() - started
            self._call(self._session_ended, "session_ended", conn, conn, error, duration)

    def watch_handler(self, handler: F) -> F:
        """``handler`` (a service's; the connection is its last argument), reporting
        each call as a session. Made once per service, in its Trio run.

        It runs for every request, so it does the least it can: the run's clock
        is looked up here, not per call (``trio.current_time`` costs several
        times the clock's own read), it is read only when an observer wants the
        duration, and a handler that returned calls the observers in a loop of
        its own (the generic dispatch costs as much as the calls).
        """
        starts = self._session_started
        ends = self._session_ended
        now = trio.lowlevel.current_clock().current_time
        call = self._call

        async def observed(*args: Any) -> Any:
            conn = args[-1]
            if starts:
                call(starts, "session_started", conn, conn)
            if not ends:
                return await handler(*args)
            started = now()
            try:
                result = await handler(*args)
            except BaseException as exc:
                call(ends, "session_ended", conn, conn, exc, now() - started)
                raise
            duration = now() - started
            for end in ends:
                try:
                    end(conn, None, duration)
                except Exception as exc:
                    _report(end, "session_ended", conn, exc)
            return result

        return observed  # type: ignore[return-value]

    def pool_wait(self, target: Any, duration: float) -> None:
        """See :meth:`Observer.pool_wait`."""
        self._call(self._calls["pool_wait"], "pool_wait", target, target, duration)

    def retry(self, target: Any, attempt: int, error: BaseException) -> None:
        """See :meth:`Observer.retry`."""
        self._call(self._calls["retry"], "retry", target, target, attempt, error)


def _report(call: Callable[..., object], event: str, subject: object, exc: Exception) -> None:
    """Log what an observer's method raised, naming the observer and what the event was about."""
    logger.error(
        "observer %s.%s for %s raised %r",
        type(getattr(call, "__self__", call)).__name__,
        event,
        _name_of(subject),
        exc,
        exc_info=exc,
    )


def _name_of(subject: object) -> object:
    """How a log line names what an event was about: a connection by its peer."""
    peer = getattr(subject, "peer", None)
    return subject if peer is None else peer


def check_observers(observers: Iterable[Observer] | None) -> tuple[Observer, ...]:
    """``observers`` as a tuple, each checked to be an :class:`Observer`."""
    if observers is None:
        return ()
    if isinstance(observers, Observer):
        raise TypeError("observers must be a list of Observer objects, not one Observer")
    found = tuple(observers)
    for observer in found:
        if not isinstance(observer, Observer):
            raise TypeError(
                f"observers must be triocomm.Observer instances, got {type(observer).__name__}"
            )
    return found
