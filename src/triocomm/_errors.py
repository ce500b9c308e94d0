"""The exception family of triocomm.

Every error that triocomm raises on its own account is a :class:`CommError`.
Each one carries the facts a user needs to act on it: the peer, the phase, the
limit. Some also derive from the builtin or Trio exception a user would
naturally catch (``TimeoutError``, ``trio.BrokenResourceError``), so code that
does not know triocomm still handles them correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

__all__ = [
    "CommError",
    "CommTimeout",
    "ConnectError",
    "ConnectionLost",
    "FrameTooLarge",
    "ProtocolError",
    "UpstreamUnavailable",
]


class CommError(Exception):
    """Base class of every error raised by triocomm itself."""


class ProtocolError(CommError):
    """The peer sent bytes that the codec cannot turn into a message.

    A connection that raises it moves to :attr:`ConnState.ERROR` and is closed:
    after bad input the byte stream can no longer be trusted to be in sync.

    Attributes:
        messages: the messages that the same ``feed`` call completed before
            the bad bytes, in order (empty if none). The built-in decoders fill
            it in, and a user decoder may too. :meth:`Connection.receive`
            returns them before raising the error, so requests that arrived
            whole ahead of the garbage are not lost (a server still answers
            them before it closes the connection).
    """

    messages: Sequence[Any] = ()


class FrameTooLarge(ProtocolError):
    """A message exceeds the codec's bound (``max_frame``, ``max_line``).

    Raised as soon as the excess is known (for a length header: before any of
    the announced payload is buffered), so a peer cannot make us allocate more
    than the bound.

    Attributes:
        size: the announced or observed size in bytes (a lower bound when the
            message is still incomplete).
        limit: the bound that was exceeded.
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ConnectionLost(CommError, trio.BrokenResourceError):
    """The peer went away in the middle of a message, or the connection was reset.

    Also a :class:`trio.BrokenResourceError`, so code written for plain Trio
    streams handles it. A clean close *between* messages is not an error: it
    is reported as :class:`trio.EndOfChannel` by :meth:`Connection.receive`.
    """


class CommTimeout(CommError, TimeoutError):
    """A per-phase time limit ran out.

    Also a builtin :class:`TimeoutError`.

    Attributes:
        phase: which limit: ``"connect"``, ``"send"``, ``"first_response"``,
            ``"receive"``, ``"inactivity"``, ``"pool"``, ``"first_request"``,
            ``"keepalive"``, ``"handshake"``, or a service's minimum data
            rates ``"receive_rate"`` and ``"send_rate"``.
        limit: the limit in seconds; for the rates, in bytes per second.
        peer: the remote address or target description, if known.
    """

    def __init__(self, phase: str, limit: float, peer: object = None) -> None:
        where = f" with {peer}" if peer is not None else ""
        if phase.endswith("_rate"):
            what = f"slower than {limit:g} bytes/s on average"
        else:
            what = f"no progress within {limit:g}s"
        super().__init__(f"{phase} timeout: {what}{where}")
        self.phase = phase
        self.limit = limit
        self.peer = peer


class ConnectError(CommError):
    """A new connection could not be made: refused, unreachable, unresolvable,
    or the TLS handshake failed.

    The original exception is chained as ``__cause__``.

    Attributes:
        address: the address (or target description) that was tried.
    """

    def __init__(self, message: str, *, address: object) -> None:
        super().__init__(message)
        self.address = address


class UpstreamUnavailable(CommError):
    """Every address of an :class:`Upstream` is fused (circuit open)."""
