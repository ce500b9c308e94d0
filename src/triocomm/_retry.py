"""Retries: the :class:`RetryPolicy` value, the kinds of failure it names, the budget.

A client session is one or more *attempts*. When an attempt fails, the client
(``_client.py``) asks this module which *kind* of failure it was
(:func:`session_failure_kind`, :func:`connect_failure_kind`) and whether the
session's policy lets it try again (:meth:`SessionAttempts.allows`); the
client's :class:`RetryWindow` says whether the retry budget has room. No I/O
here: the client waits out the backoff and makes the next attempt.

Rules kept by this module:

* Never after a byte of the reply arrived: the client passes ``replied`` and
  no kind is returned for such a failure.
* ``"lost"`` and ``"timeout"`` are retried only for an idempotent call: the
  request may have reached the peer and had its effect.
* A cancellation is no kind at all: a cancelled session is never retried.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from ._errors import CommTimeout, ConnectError

__all__ = [
    "RetryPolicy",
    "RetryWindow",
    "SessionAttempts",
    "add_note",
    "as_policy",
    "connect_failure_kind",
    "session_failure_kind",
]

RetryKind = Literal["stale", "connect", "lost", "timeout"]
KINDS: tuple[RetryKind, ...] = ("stale", "connect", "lost", "timeout")
# Kinds where the request may have reached the peer: retried only when the
# call says it may be repeated.
_NEEDS_IDEMPOTENT = frozenset({"lost", "timeout"})
# Timeouts that end the wait for the reply's first byte: first_response, or
# inactivity when it is the shorter of the two limits on that same wait.
_REPLY_WAIT_PHASES = frozenset({"first_response", "inactivity"})

# The budget's window, and the retries it allows in any window on top of
# its fraction, so that a client with little traffic can still retry.
BUDGET_WINDOW = 10.0
BUDGET_FLOOR = 30
# How often the window samples the client's counters while a budget is used.
_SAMPLE_EVERY = 1.0

# The jitter factor's source (tests replace it).
_jitter: Callable[[], float] = random.random


def _check_seconds(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"RetryPolicy {name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0 or value == math.inf:
        raise ValueError(f"RetryPolicy {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed session is tried again, and how long it waits first.

    Pass one to ``open_client(retries=)`` or, for one call, to ``retries=``
    of ``request``, ``run`` or ``connection``. An int ``n`` given there means
    ``RetryPolicy(attempts=n + 1, on=("stale",))``: the first release's rule.

    Args:
        attempts: the most attempts of one session, the first included
            (1: never retry).
        on: the kinds of failure that are retried; any of

            * ``"stale"``: a *reused* connection failed (closed or reset by
              the peer) before any byte of the reply arrived, whether while
              the request was being written or after. Usually the keep-alive
              race: the peer closed the idle connection just before we sent.
              The peer may still have received the request, so a
              non-idempotent call is delivered *at least once*.
            * ``"connect"``: a new connection could not be made (refused,
              unreachable, unresolvable, connect timeout, TLS handshake). The
              same target is tried again; nothing was sent. (With an
              :class:`Upstream` a failed connect is retried on another
              address, within ``attempts``, even without this kind.)
            * ``"lost"``: a *fresh* connection was closed or reset after the
              request began to go out and before any byte of the reply:
              retried only when the call says ``idempotent=True``.
            * ``"timeout"``: no reply byte arrived within ``first_response``
              (or within ``inactivity``, when that shorter limit ends the
              same wait): retried only when ``idempotent=True``.

        backoff: the wait before attempt 2, in seconds; it doubles for each
            attempt after that. Attempt ``n`` waits
            ``min(max_backoff, backoff * 2 ** (n - 2))``.
        max_backoff: the longest wait between two attempts.
        jitter: multiply each wait by a uniform random factor in [0, 1), so
            that clients failing together do not retry together.
        budget: ``None`` (no budget) or a fraction such as ``0.1``: a retry
            is allowed only while the client's retries over the last 10
            seconds number fewer than ``budget`` times its session attempts
            over those 10 seconds, plus 30. A failing peer then sees at
            most about ``budget`` more load from retries, not ``attempts``
            times as much.

    Whatever the policy, a session is never retried once a byte of the reply
    arrived, nor after it was cancelled. The error raised after the last
    attempt is that attempt's, with the earlier attempts' errors attached as
    notes (``exc.__notes__``).

    Raises:
        TypeError, ValueError: a field is of the wrong type or out of range.
    """

    attempts: int = 2
    on: tuple[RetryKind, ...] = field(default=("stale",))
    backoff: float = 0.0
    max_backoff: float = 1.0
    jitter: bool = True
    budget: float | None = None

    def __post_init__(self) -> None:
        attempts = self.attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"RetryPolicy attempts must be an int >= 1, got {attempts!r}")
        on_given: object = self.on
        if isinstance(on_given, str) or not isinstance(on_given, Iterable):
            raise TypeError(
                f"RetryPolicy on must be a tuple of kinds such as ('stale',), got {self.on!r}"
            )
        on = tuple(self.on)
        unknown = [kind for kind in on if kind not in KINDS]
        if unknown:
            raise ValueError(
                f"unknown retry kind {unknown[0]!r}; use any of {', '.join(map(repr, KINDS))}"
            )
        # Canonical order, no duplicates: equal policies compare (and hash) equal.
        object.__setattr__(self, "on", tuple(kind for kind in KINDS if kind in on))
        _check_seconds(self.backoff, "backoff")
        _check_seconds(self.max_backoff, "max_backoff")
        if not isinstance(self.jitter, bool):
            raise TypeError(f"RetryPolicy jitter must be a bool, got {self.jitter!r}")
        budget = self.budget
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)):
                raise TypeError(f"RetryPolicy budget must be a number or None, got {budget!r}")
            if math.isnan(budget) or budget < 0 or budget == math.inf:
                raise ValueError(f"RetryPolicy budget must be a finite number >= 0, got {budget!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (2 for the first retry)."""
        if attempt < 2:
            return 0.0
        # min() first: 2 ** n of a large n must not overflow a float.
        wait = self.backoff * 2.0 ** min(attempt - 2, 1023) if self.backoff else 0.0
        wait = min(self.max_backoff, wait)
        if self.jitter and wait:
            wait *= _jitter()
        return wait

    def replace(self, **changes: Any) -> RetryPolicy:
        """Return a copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=64)
def _from_int(retries: int) -> RetryPolicy:
    return RetryPolicy(attempts=retries + 1, on=("stale",))


def as_policy(retries: int | RetryPolicy) -> RetryPolicy:
    """``retries=`` as a policy: an int ``n`` is ``RetryPolicy(attempts=n + 1, on=("stale",))``.

    Raises:
        ValueError: a negative int.
        TypeError: neither an int nor a :class:`RetryPolicy`.
    """
    if isinstance(retries, RetryPolicy):
        return retries
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int >= 0 or a RetryPolicy, got {retries!r}")
    if retries < 0:
        raise ValueError(f"retries must be an int >= 0 or a RetryPolicy, got {retries!r}")
    return _from_int(retries)


# -- kinds of failure -------------------------------------------------------------


def connect_failure_kind(exc: BaseException) -> RetryKind | None:
    """``"connect"`` for a failed connect (or its timeout), else None."""
    if isinstance(exc, ConnectError) or (isinstance(exc, CommTimeout) and exc.phase == "connect"):
        return "connect"
    return None


def session_failure_kind(exc: BaseException, *, reused: bool, replied: bool) -> RetryKind | None:
    """The kind of a failed attempt on a connection, or None if it is never retried.

    ``reused``: the connection came from the pool. ``replied``: a byte of
    the reply (anything at all) arrived during the attempt.
    """
    if replied:
        return None
    if isinstance(exc, (trio.BrokenResourceError, trio.EndOfChannel)):
        # Closed or reset by the peer (ConnectionLost is a BrokenResourceError).
        return "stale" if reused else "lost"
    if isinstance(exc, CommTimeout) and exc.phase in _REPLY_WAIT_PHASES:
        return "timeout"
    return None


# -- one session's attempts -------------------------------------------------------


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)``, also on Python 3.10, which has no ``add_note``.

    There the note goes to ``__notes__`` as 3.11 would put it (the
    ``exceptiongroup`` backport's traceback printing shows it).
    """
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
        return
    notes = getattr(exc, "__notes__", None)  # pragma: no cover - Python 3.10
    if not isinstance(notes, list):  # pragma: no cover
        notes = []
    notes.append(note)  # pragma: no cover
    exc.__notes__ = notes  # type: ignore[attr-defined]  # pragma: no cover


class SessionAttempts:
    """The attempts of one session: its policy, the attempt number, the errors so far.

    Made by the client when an attempt first fails (never on a session that
    succeeds at once), and used only by that session's task.
    """

    __slots__ = ("errors", "idempotent", "number", "policy")

    def __init__(self, policy: RetryPolicy, idempotent: bool) -> None:
        self.policy = policy
        self.idempotent = idempotent
        self.number = 1  # the attempt that just failed, or is running
        self.errors: list[str] = []

    def allows(self, kind: RetryKind | None, *, elsewhere: bool = False) -> bool:
        """Whether the policy lets a failure of ``kind`` be tried again.

        ``elsewhere``: the retry can go to an address of an :class:`Upstream`
        not yet tried, which the first release allowed after a failed connect
        whatever the kinds.
        """
        if kind is None or self.number >= self.policy.attempts:
            return False
        if kind in _NEEDS_IDEMPOTENT and not self.idempotent:
            return False
        return kind in self.policy.on or (kind == "connect" and elsewhere)

    def failed(self, exc: BaseException, kind: RetryKind | None, where: object) -> None:
        """Note the error of the attempt that failed, for the error raised at the end."""
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        label = f" ({kind})" if kind is not None else ""
        self.errors.append(f"attempt {self.number} with {where} failed{label}: {what}")

    def next(self) -> float:
        """Move to the next attempt; returns the seconds to wait before it."""
        self.number += 1
        return self.policy.delay(self.number)

    def annotate(self, exc: BaseException, reason: str | None = None) -> None:
        """Attach the earlier attempts' errors (and why no retry followed) to ``exc``."""
        for note in self.errors:
            add_note(exc, note)
        self.errors = []  # a retry loop that raises twice must not note twice
        if reason is not None:
            add_note(exc, reason)


# -- the budget -------------------------------------------------------------------


class RetryWindow:
    """A client's retries and session attempts over the last 10 seconds.

    The counters are the client's own totals (read through ``attempts``, which
    costs the hot path nothing: the pools count attempts anyway); the window
    samples them once a second, through the client's timers, from the first
    time a budget is consulted. The window then covers between 10 and 11
    seconds; before 10 seconds of samples exist it covers what there is.
    """

    __slots__ = ("_attempts", "_retries", "_samples", "_timers")

    def __init__(self, attempts: Callable[[], int], timers: Any) -> None:
        self._attempts = attempts
        self._timers = timers
        self._retries = 0
        # (time, attempts, retries) samples, oldest first; empty until used.
        self._samples: deque[tuple[float, int, int]] = deque()

    def retried(self) -> None:
        """Count one retry."""
        self._retries += 1

    def allows(self, budget: float) -> bool:
        """Whether one more retry fits ``budget`` (see :class:`RetryPolicy`)."""
        samples = self._samples
        if not samples:
            now = trio.current_time()
            samples.append((now, self._attempts(), self._retries))
            self._timers.arm(self, now + _SAMPLE_EVERY)
        _, attempts_then, retries_then = samples[0]
        retries = self._retries - retries_then
        # Session attempts, not counting the retries among them.
        sessions = self._attempts() - attempts_then - retries
        return retries < budget * sessions + BUDGET_FLOOR

    def _on_alarm(self, now: float) -> float:
        """The timers' call: sample the counters, forget what left the window."""
        samples = self._samples
        samples.append((now, self._attempts(), self._retries))
        while len(samples) >= 2 and samples[1][0] <= now - BUDGET_WINDOW:
            samples.popleft()
        return now + _SAMPLE_EVERY
