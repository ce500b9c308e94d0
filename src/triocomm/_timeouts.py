"""Time limits: the :class:`Timeouts` of a client and the :class:`ServerTimeouts` of a service.

Both are immutable values. Each time limit is a number of seconds, or ``None``
for no limit; a service's minimum data rates are bytes per second, or
``None`` for none. Exceeding one raises :class:`CommTimeout` naming the phase.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
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


def _check_rate(value: object, name: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name!r} must be a number of bytes per second or None, got {value!r}")
    # 0 would mean "no minimum", which None already says; inf would be a
    # whole-message limit of rate_grace in disguise.
    if not 0 < value < math.inf:
        raise ValueError(f"{name!r} must be > 0 and finite (None: no minimum), got {value!r}")


def _check_grace(value: object, name: str) -> None:
    if value is None:
        raise TypeError(f"{name!r} must be a number of seconds (the rates' None turns them off)")
    _check(value, name)


class Limits:
    """The limits a connection applies to its reads and writes in one session.

    Built from a :class:`Timeouts` or :class:`ServerTimeouts` once per value
    (see their cached ``_limits`` properties) and shared by every connection
    that runs under that value: setting a session's limits is one assignment.
    Never mutated.
    """

    __slots__ = (
        "first_phase",
        "first_timeout",
        "inactivity",
        "rate_grace",
        "receive",
        "receive_rate",
        "send",
        "send_rate",
        "unlimited",
    )

    def __init__(
        self,
        *,
        send: float | None = None,
        first_phase: str = "first_response",
        first_timeout: float | None = None,
        receive: float | None = None,
        inactivity: float | None = None,
        receive_rate: float | None = None,
        send_rate: float | None = None,
        rate_grace: float = 0.0,
    ) -> None:
        self.send = send
        self.first_phase = first_phase
        self.first_timeout = first_timeout
        self.receive = receive
        self.inactivity = inactivity
        # Minimum average rates (bytes per second) of a message arriving / being
        # written, enforced once rate_grace seconds have passed since it began.
        self.receive_rate = receive_rate
        self.send_rate = send_rate
        self.rate_grace = rate_grace
        # Read on every send and receive: computed once here.
        limits = (send, first_timeout, receive, inactivity, receive_rate, send_rate)
        self.unlimited = limits == (None,) * len(limits)


class _TimeoutsBase:
    # Fields both kinds have (declared by the dataclasses below).
    send: float | None
    receive: float | None
    inactivity: float | None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            f.metadata.get("check", _check)(getattr(self, f.name), f.name)

    def _limits_for(self, first_phase: str, first_timeout: float | None, **rates: Any) -> Limits:
        """The limits of a session whose first wait is ``first_phase``."""
        return Limits(
            send=self.send,
            first_phase=first_phase,
            first_timeout=first_timeout,
            receive=self.receive,
            inactivity=self.inactivity,
            **rates,
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
    """Per-phase time limits of a service, in seconds (``None`` = no limit),
    and the minimum data rates that end a trickling (slowloris) peer.

    ``receive`` and ``send`` are off by default, so that a large, slow but
    steady transfer is never cut; the minimum rates end a peer that trickles
    instead. Breaking a limit raises :class:`CommTimeout` naming the phase
    (``"receive_rate"`` / ``"send_rate"`` for the rates), and the service
    closes the connection and counts it in ``ServerStats.errors["timeout"]``.

    Attributes:
        first_request: from accepting a connection to the first byte of its
            first request.
        receive: from the first byte of a request to the whole request.
        inactivity: the longest wait for any single read or write to make
            progress.
        send: writing the whole reply.
        keepalive: between requests: from the last reply to the first byte of
            the next request. A connection waiting there is bound by this
            alone.
        handshake: the TLS handshake.
        min_receive_rate: bytes per second (``None``: no minimum). Once
            ``rate_grace`` seconds have passed since the first byte of a
            request, the bytes of it received so far divided by the seconds
            since that byte must stay at or above this.
        min_send_rate: bytes per second (``None``: no minimum). The same for a
            reply being written, counting the bytes the kernel has taken,
            from the moment the write began.
        rate_grace: seconds from the start of a message before the minimum
            rates apply (a number, not ``None``).
    """

    first_request: float | None = 10.0
    receive: float | None = None
    inactivity: float | None = 10.0
    send: float | None = None
    keepalive: float | None = 60.0
    handshake: float | None = 10.0
    min_receive_rate: float | None = field(default=240.0, metadata={"check": _check_rate})
    min_send_rate: float | None = field(default=240.0, metadata={"check": _check_rate})
    rate_grace: float = field(default=5.0, metadata={"check": _check_grace})

    def replace(self, **changes: Any) -> ServerTimeouts:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    # The limits of a passive connection, shared by all of a service's
    # connections: before its first request, and from then on.

    @cached_property
    def _first_request_limits(self) -> Limits:
        return self._limits_for("first_request", self.first_request, **self._rates)

    @cached_property
    def _keepalive_limits(self) -> Limits:
        return self._limits_for("keepalive", self.keepalive, **self._rates)

    @property
    def _rates(self) -> dict[str, Any]:
        return {
            "receive_rate": self.min_receive_rate,
            "send_rate": self.min_send_rate,
            "rate_grace": self.rate_grace,
        }


def session_limits(timeouts: Timeouts) -> Limits:
    """The limits of a client session under ``timeouts`` (built once per value)."""
    return timeouts._limits


def passive_limits(timeouts: ServerTimeouts) -> tuple[Limits, Limits]:
    """The limits of a passive connection: before its first request, and from then on."""
    return timeouts._first_request_limits, timeouts._keepalive_limits
