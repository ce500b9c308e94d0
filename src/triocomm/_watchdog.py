"""One task that enforces the read limits of many connections, without a cancel scope per read.

A read that must wait for its socket needs a deadline (``first_response``,
``keepalive``, ``inactivity``...). A :class:`trio.CancelScope` per wait is the
obvious tool, but entering and leaving one costs more than the rest of a
request's bookkeeping together (about 5 µs on CPython 3.11, trio 0.35), and a
connection in a request/reply exchange waits once per request.

So the client and the server each run one :class:`Watchdog` task in their
nursery. A connection about to wait writes its deadline into
``conn._wait_deadline``, and only if the watchdog does not already hold an
earlier alarm for it, pushes one onto the watchdog's heap: with a constant
limit (10 s of inactivity) every new deadline is later than the alarm already
set, so the usual wait costs two attribute stores. When an alarm comes due the
watchdog looks at what the connection is waiting for *now*: nothing (the alarm
is dropped), a later deadline (the alarm is moved there), or a deadline that
has passed: the connection is marked expired and the task waiting on its
socket is woken with :func:`trio.lowlevel.notify_closing`; it raises the
:class:`~triocomm.CommTimeout` of its phase and closes the connection, as a
cancel scope's deadline would have.

At most one live alarm per connection sits in the heap (the one whose
sequence number the connection holds); alarms of closed or rearmed
connections are skipped when they come due and swept out when they
outnumber the live ones, so a server churning through short connections holds
no closed connection for longer than a sweep.
"""

from __future__ import annotations

import heapq
import math
from itertools import count
from typing import Any

import trio

_INF = math.inf
# Sweep the heap when it holds more dead alarms than this, and more than live ones.
_SWEEP_MIN = 64


class Watchdog:
    """Deadlines of the waiting reads of many connections, kept by one task (:meth:`run`)."""

    __slots__ = ("_dead", "_heap", "_running", "_scope", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = count()
        self._dead = 0
        self._scope: trio.CancelScope | None = None
        self._running = False

    @property
    def running(self) -> bool:
        """Whether the task is keeping time (connections fall back to cancel scopes otherwise)."""
        return self._running

    def __len__(self) -> int:
        """Alarms in the heap, live and dead (for tests)."""
        return len(self._heap)

    def arm(self, conn: Any, deadline: float) -> None:
        """Make sure ``conn`` is looked at no later than ``deadline``."""
        if conn._wd_at != _INF:
            self._dead += 1  # its earlier alarm is replaced by this one
        seq = next(self._seq)
        conn._wd_at = deadline
        conn._wd_seq = seq
        heapq.heappush(self._heap, (deadline, seq, conn))
        scope = self._scope
        if scope is not None and deadline < scope.deadline:
            scope.deadline = deadline
        self._maybe_sweep()

    def forget(self, conn: Any) -> None:
        """``conn`` is closed: its alarm, if any, is dead."""
        if conn._wd_at != _INF:
            conn._wd_at = _INF
            conn._wd_seq = -1
            self._dead += 1
            self._maybe_sweep()

    def _maybe_sweep(self) -> None:
        dead = self._dead
        if dead > _SWEEP_MIN and dead * 2 > len(self._heap):
            # In place: _fire may be iterating over this very list.
            heap = self._heap
            heap[:] = [alarm for alarm in heap if alarm[2]._wd_seq == alarm[1]]
            heapq.heapify(heap)
            self._dead = 0

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
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, conn = heapq.heappop(heap)
            if conn._wd_seq != seq:
                self._dead -= 1  # replaced by a later alarm, or its connection closed
                continue
            conn._wd_at = _INF
            conn._wd_seq = -1
            wait = conn._wait_deadline
            if wait <= now:
                conn._expire()
            elif wait != _INF:
                self.arm(conn, wait)
