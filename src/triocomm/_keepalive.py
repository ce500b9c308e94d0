"""TCP keep-alive: one function that client connections and accepted ones both use.

A peer that vanished without a word (a NAT or a firewall dropped the flow, the
host lost power) leaves an idle TCP connection looking healthy for as long as
nothing is sent. With keep-alive on, the kernel probes such a connection after
``idle`` seconds of silence and resets it when the probes go unanswered, which
wakes whoever watches the socket (the pool's idle watcher, a server's read).
"""

from __future__ import annotations

import math
import socket

import trio

from ._connection import socket_of

__all__ = ["KEEPALIVE_PROBES", "check_tcp_keepalive", "set_tcp_keepalive"]

#: Unanswered probes after which the kernel gives up on the connection. The
#: probes go out every ``idle / KEEPALIVE_PROBES`` seconds (at least 1 s), so a
#: dead peer is found about ``2 * idle`` seconds after the connection went quiet.
KEEPALIVE_PROBES = 3


def check_tcp_keepalive(value: object, name: str = "tcp_keepalive") -> None:
    """Raise unless ``value`` is ``None`` or a number of seconds >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if not 1 <= value < math.inf:
        raise ValueError(f"{name} must be >= 1 and finite (seconds), got {value!r}")


def set_tcp_keepalive(stream: trio.abc.Stream, idle: float) -> bool:
    """Turn on keep-alive probes after ``idle`` seconds of silence on ``stream``'s socket.

    Sets ``SO_KEEPALIVE`` and, where the platform has them, ``TCP_KEEPIDLE``
    (``TCP_KEEPALIVE`` on macOS), ``TCP_KEEPINTVL`` and ``TCP_KEEPCNT``. The
    kernel counts whole seconds: ``idle`` is rounded up. Returns False (and
    changes nothing) for a stream that is not TCP: a Unix socket, a memory
    stream.
    """
    sock = socket_of(stream)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    seconds = max(1, math.ceil(idle))
    interval = max(1, math.ceil(seconds / KEEPALIVE_PROBES))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle_option = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    for option, value in (
        (idle_option, seconds),
        (getattr(socket, "TCP_KEEPINTVL", None), interval),
        (getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
    ):
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return True
