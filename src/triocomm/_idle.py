"""Idle detection for one connection: call ``on_idle(conn, status)`` while it stays idle.

MINA's idle events, as the server's ``idle=`` / ``on_idle=`` give them, for a
connection a client borrowed with ``client.connection(target, idle=...,
on_idle=...)`` (heartbeats on a long subscription). An :class:`IdleWatch` is
one alarm target of the client's :class:`~triocomm._timers.Timers`: no task
and no timer of its own. It looks at the connection only when an idle period
could have ended, so the cost is per period, never per read or write.

Rules kept here (the server's idle detection keeps the same ones, deciding
what is due with the same :func:`idle_statuses_due`):

* A status idle for its period fires, then again every period while the
  connection stays idle in that way (``idle_time(status)``).
* One callback runs at a time per connection; statuses that come due while
  it runs wait for it, each at most once, so a slow callback skips beats
  instead of piling them up.
* A callback that raises is logged and closes the connection (the borrower
  sees it closed); one that finds the connection closed ends quietly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from ._connection import Connection, Idle
from ._timers import Timers

__all__ = ["IdleCallback", "IdleWatch", "call_on_idle", "check_idle_options", "idle_statuses_due"]

logger = logging.getLogger("triocomm.client")

IdleCallback = Callable[[Connection[Any, Any], Idle], Awaitable[object]]


def check_idle_options(idle: Mapping[Idle, float] | None, on_idle: object) -> dict[Idle, float]:
    """``idle`` as a dict, checked: positive finite periods, and ``on_idle`` given with it."""
    periods = dict(idle or {})
    for status, period in periods.items():
        if not isinstance(status, Idle):
            raise TypeError(f"idle keys must be Idle.READ, Idle.WRITE or Idle.BOTH, got {status!r}")
        if isinstance(period, bool) or not isinstance(period, (int, float)):
            raise TypeError(f"idle period for {status.name} must be seconds, got {period!r}")
        if not 0 < period < math.inf:
            raise ValueError(
                f"idle period for {status.name} must be > 0 and finite, got {period!r}"
            )
    if periods and on_idle is None:
        raise ValueError("idle= needs on_idle=, the callback to call when a connection is idle")
    if not periods and on_idle is not None:
        raise ValueError("on_idle= needs idle=, e.g. idle={Idle.READ: 30.0}")
    return periods


def idle_statuses_due(
    conn: Connection[Any, Any], periods: Mapping[Idle, float], fired: dict[Idle, float], now: float
) -> tuple[list[Idle], float]:
    """The statuses of ``conn`` idle for their period at ``now``, and when to look next.

    ``fired`` holds when each status last fired; a status due now is marked
    fired at ``now``, so it fires again only after another whole period of
    idleness. The client's :class:`IdleWatch` and the server's idle detection
    both decide with this, then run their callbacks their own way.
    """
    due_now = []
    following = math.inf
    for status, period in periods.items():
        quiet_since = max(now - conn.idle_time(status), fired.get(status, -math.inf))
        due = quiet_since + period
        if due <= now:
            fired[status] = now
            due = now + period
            due_now.append(status)
        following = min(following, due)
    return due_now, following


async def call_on_idle(
    conn: Connection[Any, Any],
    on_idle: IdleCallback,
    status: Idle,
    waiting: list[Idle],
    scope: trio.CancelScope,
    watching: Callable[[], bool],
    log: logging.Logger,
) -> bool:
    """Run ``on_idle(conn, status)``, then once for each status in ``waiting``.

    Runs in ``scope`` while ``watching()`` holds; the client's
    :class:`IdleWatch` and the server's idle detection both call it. A
    connection that went away while the callback used it ends the run
    quietly; any other exception is logged on ``log``, naming the peer, and
    closes the connection. Returns False when the callback raised.
    """
    try:
        with scope:
            while watching():
                await on_idle(conn, status)
                if not waiting:
                    break
                status = waiting.pop(0)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the connection went away while the callback used it
    except Exception as exc:
        log.error(
            "closing connection with %s: on_idle(%s) raised %r",
            conn.peer,
            status.name,
            exc,
            exc_info=exc,
        )
        await conn.abort()
        return False
    return True


class IdleWatch:
    """Calls ``on_idle(conn, status)`` for ``conn``'s idle statuses until :meth:`stop`.

    Args:
        conn: the connection watched.
        periods: seconds of idleness per status, e.g. ``{Idle.READ: 30.0}``.
        on_idle: the async callback.
        spawn: where callbacks run (the client's ``nursery.start_soon``).
        timers: the alarms of the client.
    """

    __slots__ = ("_callback", "_conn", "_fired", "_on_idle", "_periods", "_spawn", "_timers")

    def __init__(
        self,
        conn: Connection[Any, Any],
        periods: Mapping[Idle, float],
        on_idle: IdleCallback,
        spawn: Callable[..., object],
        timers: Timers,
    ) -> None:
        self._conn: Connection[Any, Any] | None = conn
        self._periods = periods
        self._on_idle = on_idle
        self._spawn = spawn
        self._timers = timers
        # When each status last fired, so a status fires once per period.
        self._fired: dict[Idle, float] = {}
        # The running callback's scope and the statuses waiting for it.
        self._callback: tuple[trio.CancelScope, list[Idle]] | None = None
        timers.arm(self, trio.current_time() + min(periods.values()))

    def stop(self) -> bool:
        """Stop watching; cancel a running callback. True if one was running.

        A callback cancelled may have been part-way through a send, so its
        connection must not be reused then.
        """
        self._conn = None
        self._timers.disarm(self)
        callback = self._callback
        if callback is None:
            return False
        callback[0].cancel()
        return True

    def _on_alarm(self, now: float) -> float:
        """The timers' call: fire the statuses whose period ended; return when to look next."""
        conn = self._conn
        if conn is None or conn.is_closed:
            return math.inf
        due_now, following = idle_statuses_due(conn, self._periods, self._fired, now)
        for status in due_now:
            if self._callback is None:
                self._callback = (trio.CancelScope(), [])
                self._spawn(self._run, conn, status)
            elif status not in self._callback[1]:
                self._callback[1].append(status)
        return following

    async def _run(self, conn: Connection[Any, Any], status: Idle) -> None:
        assert self._callback is not None
        scope, waiting = self._callback
        try:
            await call_on_idle(
                conn, self._on_idle, status, waiting, scope, lambda: self._conn is conn, logger
            )
        finally:
            if self._callback is not None and self._callback[0] is scope:
                self._callback = None
