"""One task that keeps the deadlines of many objects: the only timer mechanism of triocomm.

A read that must wait needs a deadline (``first_response``, ``keepalive``,
``inactivity``...), and a service with ``idle=`` needs to look at each
connection once per idle period. A :class:`trio.CancelScope` per wait is the
obvious tool, but entering and leaving one costs more than the rest of a
request's bookkeeping together, and a request/reply connection waits once per
request. So a client and a service each run one :class:`Timers` task in their
nursery, and everything that must happen at a time registers an *alarm* here.

Rules kept by this module:

* An alarm belongs to a *target* (a connection, a service's record of one),
  which has at most one live alarm: :meth:`Timers.arm` keeps the earlier of
  the live alarm and the new time, so a wait whose deadline is later than the
  alarm already set costs a dict look-up and nothing more.
* When an alarm comes due, the target's ``_on_alarm(now)`` is called. It
  decides what is due *now* (nothing, because the wait ended; a later time;
  or an expiry) and returns the next time it wants to be looked at, or
  ``math.inf``. Alarms are therefore lazy: I/O never cancels an alarm, it
  only makes the next look find nothing to do.
* Alarms of targets that are gone (:meth:`Timers.disarm`) or were replaced
  by an earlier one stay in the heap until they come due or until they
  outnumber the live ones, when the heap is swept; so a server churning
  through short connections holds no closed connection longer than a sweep.
"""

from __future__ import annotations

import heapq
import math
from itertools import count
from typing import Any, Protocol

import trio

_INF = math.inf
# Sweep the heap when it holds more dead alarms than this, and more than live ones.
_SWEEP_MIN = 64


class AlarmTarget(Protocol):
    """What :class:`Timers` calls when a target's alarm comes due."""

    def _on_alarm(self, now: float) -> float:
        """Act on what is due at ``now``; return when to be looked at next (``inf``: never)."""


class Timers:
    """The alarms of many targets, kept by one task (:meth:`run`)."""

    __slots__ = ("_due", "_heap", "_running", "_scope", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        # The live alarm of each target: the time its heap entry is due.
        self._due: dict[Any, float] = {}
        self._seq = count()
        self._scope: trio.CancelScope | None = None
        self._running = False

    @property
    def running(self) -> bool:
        """Whether the task is keeping time (callers fall back to cancel scopes otherwise)."""
        return self._running

    def __len__(self) -> int:
        """Alarms in the heap, live and dead (for tests)."""
        return len(self._heap)

    def arm(self, target: AlarmTarget, when: float) -> bool:
        """Make sure ``target`` is looked at no later than ``when``.

        Returns whether the task is keeping time now: if not (not yet, or no
        more), the alarm waits for it, and a caller that cannot wait must
        keep the time itself (a cancel scope).
        """
        due = self._due
        if when < due.get(target, _INF):
            due[target] = when
            heapq.heappush(self._heap, (when, next(self._seq), target))
            scope = self._scope
            if scope is not None and when < scope.deadline:
                scope.deadline = when
            self._maybe_sweep()
        return self._running

    def disarm(self, target: AlarmTarget) -> None:
        """``target`` is gone: its alarm, if any, is dead."""
        if self._due.pop(target, None) is not None:
            self._maybe_sweep()

    def _maybe_sweep(self) -> None:
        heap = self._heap
        live = len(self._due)
        if len(heap) - live > _SWEEP_MIN and len(heap) > 2 * live:
            due = self._due
            # In place: _fire may be iterating over this very list.
            heap[:] = [alarm for alarm in heap if due.get(alarm[2]) == alarm[0]]
            heapq.heapify(heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep time until cancelled (the owner's nursery ends)."""
        self._running = True
        task_status.started()
        try:
            heap = self._heap
            while True:
                with trio.CancelScope(deadline=heap[0][0] if heap else _INF) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                self._fire(trio.current_time())
        finally:
            self._running = False
            self._scope = None

    def _fire(self, now: float) -> None:
        heap, due = self._heap, self._due
        again: list[tuple[Any, float]] = []
        while heap and heap[0][0] <= now:
            when, _, target = heapq.heappop(heap)
            if due.get(target) != when:
                continue  # replaced by an earlier alarm, fired already, or disarmed
            del due[target]
            following = target._on_alarm(now)
            if following != _INF:
                again.append((target, following))
        # Re-armed after the loop: a target asking for a time already past is
        # looked at on the next pass of run(), after other tasks ran, never in
        # a loop here that would starve them.
        for target, following in again:
            self.arm(target, following)
