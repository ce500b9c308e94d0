"""The connection state machines and the timeout timelines, as data.

Nothing here runs in the library. These tables are the one description of
which :class:`ConnState` may follow which on a client and on a server
connection, and of which time limit covers which span of a session: the
documentation draws its diagrams from them (``docs/_ext/state_diagrams.py``),
and ``tests/test_states.py`` records every state change the code makes in real
sessions and checks that each one is listed here.

``ConnState.CONNECTING`` is in the enum, but no :class:`Connection` is ever in
it: a ``Connection`` is made from a stream that is already connected (and, for
TLS, past its handshake). A client's connect is a phase of the pool
(``PoolStats.connecting`` counts them), not a state of a connection.

Rules the tables follow:

* ``ERROR`` and ``CLOSED`` are final: nothing leaves them.
* Any failure (bad bytes, a reset, a timeout, a cancelled session, a handler
  that raises) moves a connection to ``ERROR``, from whichever state it was
  in; such an edge is a *failure* edge.
* A clean close goes through ``CLOSING`` to ``CLOSED``.
"""

from __future__ import annotations

from typing import NamedTuple

from ._connection import ConnState

__all__ = [
    "CLIENT",
    "CLIENT_TIMELINE",
    "SERVER",
    "SERVER_TIMELINE",
    "Moment",
    "Span",
    "Transition",
]

C = ConnState


class Transition(NamedTuple):
    """One allowed change of state, and what causes it."""

    source: ConnState
    target: ConnState
    label: str
    #: "main" (the life of a healthy connection), "close" (a clean end) or
    #: "failure" (to ERROR).
    kind: str = "main"


#: A client connection, as the pool and the session API move it.
CLIENT: tuple[Transition, ...] = (
    Transition(C.CONNECTED, C.RECEIVING, "request sent"),
    Transition(C.RECEIVING, C.SUCCESS, "reply received"),
    Transition(C.CONNECTED, C.SUCCESS, "borrowed session ended"),
    Transition(C.SUCCESS, C.IDLE, "back in the pool"),
    Transition(C.IDLE, C.CONNECTED, "lent again"),
    Transition(C.SUCCESS, C.CONNECTED, "lent to a waiting session"),
    Transition(C.SUCCESS, C.CLOSING, "not kept", "close"),
    Transition(C.IDLE, C.CLOSING, "keep-alive over", "close"),
    Transition(C.CONNECTED, C.CLOSING, "closed by the user", "close"),
    Transition(C.RECEIVING, C.CLOSING, "unasked bytes after the reply", "close"),
    Transition(C.CLOSING, C.CLOSED, "stream closed", "close"),
    Transition(C.CONNECTED, C.ERROR, "failed", "failure"),
    Transition(C.RECEIVING, C.ERROR, "failed", "failure"),
)

#: A server connection, as ``serve`` and ``serve_connections`` move it.
SERVER: tuple[Transition, ...] = (
    Transition(C.CONNECTED, C.RECEIVING, "first request"),
    Transition(C.RECEIVING, C.KEEPALIVE, "replies written"),
    Transition(C.KEEPALIVE, C.RECEIVING, "next request"),
    Transition(C.CONNECTED, C.CLOSING, "peer left, or shutdown", "close"),
    Transition(C.KEEPALIVE, C.CLOSING, "peer left, or shutdown", "close"),
    Transition(C.RECEIVING, C.CLOSING, "handler returned", "close"),
    Transition(C.CLOSING, C.CLOSED, "stream closed", "close"),
    Transition(C.CONNECTED, C.ERROR, "failed", "failure"),
    Transition(C.RECEIVING, C.ERROR, "failed", "failure"),
    Transition(C.KEEPALIVE, C.ERROR, "failed", "failure"),
)


class Moment(NamedTuple):
    """A point in the life of a connection, on a timeline."""

    name: str
    label: str


class Span(NamedTuple):
    """The stretch of a timeline that one time limit covers."""

    limit: str  # a field of Timeouts or ServerTimeouts (rate_grace is the rates' note)
    start: str  # Moment.name
    end: str  # Moment.name
    note: str = ""


#: A client session, from the call to the connection's return to the pool.
CLIENT_TIMELINE: tuple[tuple[Moment, ...], tuple[Span, ...]] = (
    (
        Moment("call", "request() called"),
        Moment("slot", "a connection is free\n(or may be opened)"),
        Moment("connected", "connected\n(TLS handshake done)"),
        Moment("sent", "request written"),
        Moment("first", "first byte of the reply"),
        Moment("reply", "whole reply received"),
        Moment("reused", "lent again, or closed"),
    ),
    (
        Span("pool", "call", "slot", "only at max_connections"),
        Span("connect", "slot", "connected", "a new connection only"),
        Span("send", "connected", "sent"),
        Span("first_response", "sent", "first"),
        Span("receive", "first", "reply"),
        Span("keepalive", "reply", "reused", "idle in the pool"),
        Span("inactivity", "connected", "reply", "each read or write"),
    ),
)

#: A server connection, from accept to close, over two requests.
SERVER_TIMELINE: tuple[tuple[Moment, ...], tuple[Span, ...]] = (
    (
        Moment("accepted", "connection accepted"),
        Moment("handshake", "ready (TLS handshake done)"),
        Moment("first", "first byte of a request"),
        Moment("request", "whole request received"),
        Moment("replied", "reply written"),
        Moment("next", "first byte of the next request\n(or close)"),
    ),
    (
        Span("handshake", "accepted", "handshake", "TLS only"),
        Span("first_request", "handshake", "first", "the first request only"),
        Span("receive", "first", "request"),
        Span("send", "request", "replied", "the handler's time is not limited"),
        Span("min_receive_rate", "first", "request", "average, after rate_grace"),
        Span("min_send_rate", "request", "replied", "average, after rate_grace"),
        Span("keepalive", "replied", "next", "between requests"),
        Span("inactivity", "first", "replied", "each read or write"),
    ),
)
