"""Time limits: the :class:`Timeouts` of a client and the :class:`ServerTimeouts` of a service.

Both are immutable values. Each field is a number of seconds, or ``None`` for
no limit. Exceeding one raises :class:`CommTimeout` naming the phase.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

__all__ = ["Limits", "ServerTimeouts", "Timeouts", "passive_limits", "session_limits"]


def _check(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"timeout {name!r} must be a number of seconds or None, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"timeout {name!r} must be >= 0, got {value!r}")


class Limits:
    """The limits a connection applies to its reads and writes in one session.

    Built from a :class:`Timeouts` or :class:`ServerTimeouts` once per value
    (see their cached ``_limits`` properties) and shared by every connection
    that runs under that value: setting a session's limits is one assignment.
    Never mutated.
    """

    __slots__ = ("first_phase", "first_timeout", "inactivity", "receive", "send", "unlimited")

    def __init__(
        self,
        *,
        send: float | None = None,
        first_phase: str = "first_response",
        first_timeout: float | None = None,
        receive: float | None = None,
        inactivity: float | None = None,
    ) -> None:
        self.send = send
        self.first_phase = first_phase
        self.first_timeout = first_timeout
        self.receive = receive
        self.inactivity = inactivity
        # Read on every send and receive: computed once here.
        self.unlimited = (send, first_timeout, receive, inactivity) == (None,) * 4


class _TimeoutsBase:
    # Fields both kinds have (declared by the dataclasses below).
    send: float | None
    receive: float | None
    inactivity: float | None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check(getattr(self, f.name), f.name)

    def _limits_for(self, first_phase: str, first_timeout: float | None) -> Limits:
        """The limits of a session whose first wait is ``first_phase``."""
        return Limits(
            send=self.send,
            first_phase=first_phase,
            first_timeout=first_timeout,
            receive=self.receive,
            inactivity=self.inactivity,
        )

    def replace(self, **changes: Any) -> Any:
        """Return a copy with the given fields changed (like :func:`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class Timeouts(_TimeoutsBase):
    """Per-phase time limits of a client session, in seconds (``None`` = no limit).

    Precedence: a call's ``timeouts=`` beats the target's, which beats
    ``open_client(timeouts=)``, which beats these defaults. An override
    replaces the whole value; build one with :meth:`replace`.

    Attributes:
        connect: TCP connect plus TLS handshake.
        send: writing the whole request.
        first_response: from the request being written to the first byte of
            the reply.
        receive: from the first byte of the reply to the whole reply.
        inactivity: the longest wait for any single read or write to make
            progress.
        keepalive: how long an idle connection stays pooled; ``0`` closes
            the connection after each session.
        pool: waiting for a free slot when ``max_connections`` are in use
            (default 30 s, so that no queue is unbounded; ``None`` waits for
            ever).
    """

    connect: float | None = 10.0
    send: float | None = None
    first_response: float | None = None
    receive: float | None = None
    inactivity: float | None = 10.0
    keepalive: float | None = 60.0
    pool: float | None = 30.0

    def replace(self, **changes: Any) -> Timeouts:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    @cached_property
    def _limits(self) -> Limits:
        # A client session's limits, built on first use and kept in the
        # instance (cached_property writes past the frozen __setattr__).
        return self._limits_for("first_response", self.first_response)


@dataclass(frozen=True)
class ServerTimeouts(_TimeoutsBase):
    """Per-phase time limits of a service, in seconds (``None`` = no limit).

    Attributes:
        first_request: from accepting a connection to the first byte of its
            first request.
        receive: from the first byte of a request to the whole request.
        inactivity: the longest wait for any single read or write to make
            progress.
        send: writing the whole reply.
        keepalive: between requests: from the last reply to the first byte of
            the next request.
        handshake: the TLS handshake.
    """

    first_request: float | None = 10.0
    receive: float | None = None
    inactivity: float | None = 10.0
    send: float | None = None
    keepalive: float | None = 60.0
    handshake: float | None = 10.0

    def replace(self, **changes: Any) -> ServerTimeouts:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    # The limits of a passive connection, shared by all of a service's
    # connections: before its first request, and from then on.

    @cached_property
    def _first_request_limits(self) -> Limits:
        return self._limits_for("first_request", self.first_request)

    @cached_property
    def _keepalive_limits(self) -> Limits:
        return self._limits_for("keepalive", self.keepalive)


def session_limits(timeouts: Timeouts) -> Limits:
    """The limits of a client session under ``timeouts`` (built once per value)."""
    return timeouts._limits


def passive_limits(timeouts: ServerTimeouts) -> tuple[Limits, Limits]:
    """The limits of a passive connection: before its first request, and from then on."""
    return timeouts._first_request_limits, timeouts._keepalive_limits
