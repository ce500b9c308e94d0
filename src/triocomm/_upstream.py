"""Upstream: several targets behind one name, with a selection policy and fuses.

An :class:`Upstream` can be passed wherever a :class:`Target` is. For each
session attempt the client asks it for an address (:meth:`Upstream.choose`,
which returns an :class:`UpstreamAttempt`) and settles that attempt when it
ends (:meth:`UpstreamAttempt.settle`). The upstream decides; the client only
follows. This module does no I/O: it is a small state machine per address
(closed → fused → half-open trial → closed or fused again), driven by the
Trio clock so that tests can use :class:`trio.testing.MockClock`.

An attempt settles with the address *entry* it started on: after
``remove(a)`` and ``add(a)`` the new entry starts from zero, and an attempt
begun before the removal touches only the old one, so ``in_flight`` is never
negative and an old failure never fuses the new entry.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import trio

from ._errors import UpstreamUnavailable

__all__ = ["AddressStats", "Upstream", "UpstreamAttempt"]

T = TypeVar("T", bound=Hashable)

Policy = Literal["round_robin", "weighted_random", "consistent_hash", "least_connections"]
_POLICIES = ("round_robin", "weighted_random", "consistent_hash", "least_connections")
# Points per unit of weight on the consistent-hash ring: enough that keys
# spread evenly (about ±10% per address) and a change moves ~1/N of them.
_VNODES = 160


@dataclass(slots=True)
class AddressStats:
    """What an :class:`Upstream` knows about one of its addresses.

    Attributes:
        weight: the address's weight.
        sessions: session attempts sent to it.
        failures: attempts that failed.
        consecutive_failures: failures since the last success.
        in_flight: attempts running now that started on this entry (not on
            an earlier entry of the same address, removed and added again).
        fused_until: Trio-clock time until which it is fused, or ``None``.
        trial: True while a half-open trial session is running.
    """

    weight: int = 1
    sessions: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    in_flight: int = 0
    fused_until: float | None = None
    trial: bool = False


class UpstreamAttempt(Generic[T]):
    """One session attempt on the address an :class:`Upstream` chose.

    Made by :meth:`Upstream.choose`; the client settles it exactly once when
    the attempt ends. It holds the address's statistics entry it was counted
    on, so it settles there even if the address was removed (and perhaps
    added again) meanwhile.

    Attributes:
        target: the address to use for this attempt.
    """

    __slots__ = ("_entry", "_open", "_trial", "_upstream", "target")

    def __init__(self, upstream: Upstream[T], target: T, entry: AddressStats, trial: bool) -> None:
        self.target = target
        self._upstream = upstream
        self._entry = entry
        self._trial = trial  # the half-open trial of a fused address
        self._open = True

    def settle(self, ok: bool | None) -> None:
        """Record how the attempt ended; call it once.

        ``ok`` is True for success, False for a failure of the address, and
        None for an outcome that says nothing about it (cancelled, the
        caller's own error, a message the codec refused).

        Raises:
            RuntimeError: the attempt was already settled.
        """
        if not self._open:
            raise RuntimeError(f"the attempt on {self.target!r} is already settled")
        self._open = False
        self._upstream._settle(self._entry, self._trial, ok)

    def __repr__(self) -> str:
        state = "open" if self._open else "settled"
        return f"<UpstreamAttempt {self.target!r} {state}>"


def _ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class Upstream(Generic[T]):
    """Several targets behind one name.

    Args:
        targets: the addresses (usually :class:`Target` objects).
        policy: ``"round_robin"`` (smooth weighted when ``weights`` are
            given), ``"weighted_random"``, ``"consistent_hash"`` (by the
            ``key=`` of each call; stable: adding or removing one of N
            addresses moves about 1/N of the keys) or
            ``"least_connections"`` (fewest sessions in flight per unit of
            weight).
        weights: one positive int per target (default all 1), or a mapping
            from target to weight.
        max_fails: consecutive failures that fuse an address.
        fuse_time: seconds an address stays fused; then one trial session is
            let through (half-open): success closes the fuse, failure fuses
            it again.

    A failed attempt that the session's :class:`RetryPolicy` retries goes to
    an address not yet tried in that session while one is available (a
    failed connect is retried elsewhere even when the policy does not name
    ``"connect"``). When every address is fused the session
    fails at once with :class:`UpstreamUnavailable`. What counts as a failure:
    connect errors, a lost connection, timeouts and protocol errors; an
    exception raised by the user's own session code does not.
    """

    def __init__(
        self,
        targets: Iterable[T],
        policy: Policy = "round_robin",
        weights: Iterable[int] | Mapping[T, int] | None = None,
        *,
        max_fails: int = 3,
        fuse_time: float = 10.0,
    ) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"unknown policy {policy!r}; use one of {', '.join(_POLICIES)}")
        if max_fails < 1:
            raise ValueError(f"max_fails must be >= 1, got {max_fails!r}")
        if fuse_time < 0:
            raise ValueError(f"fuse_time must be >= 0, got {fuse_time!r}")
        self.policy: Policy = policy
        self.max_fails = max_fails
        self.fuse_time = fuse_time
        self._order: list[T] = []
        self._stats: dict[T, AddressStats] = {}
        self._current: dict[T, int] = {}  # smooth weighted round robin state
        self._next = 0  # plain round robin position
        self._ring: list[int] = []
        self._ring_owner: list[T] = []
        targets = list(targets)
        if isinstance(weights, Mapping):
            weight_list = [weights.get(t, 1) for t in targets]
        elif weights is None:
            weight_list = [1] * len(targets)
        else:
            weight_list = list(weights)
            if len(weight_list) != len(targets):
                raise ValueError(f"{len(weight_list)} weights given for {len(targets)} targets")
        for target, weight in zip(targets, weight_list, strict=True):
            self.add(target, weight)
        if not self._order:
            raise ValueError("an Upstream needs at least one target")

    # -- membership ----------------------------------------------------------

    @property
    def targets(self) -> list[T]:
        """The addresses, in the order they were added."""
        return list(self._order)

    def add(self, target: T, weight: int = 1) -> None:
        """Add an address at run time (its weight defaults to 1)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
            raise ValueError(f"weight must be a positive int, got {weight!r}")
        if target in self._stats:
            raise ValueError(f"{target!r} is already in this upstream")
        self._order.append(target)
        self._stats[target] = AddressStats(weight=weight)
        self._current[target] = 0
        self._rebuild_ring()

    def remove(self, target: T) -> None:
        """Remove an address at run time; sessions already on it finish normally.

        Their outcomes settle on the removed entry: adding the address again
        starts it afresh (no sessions in flight, no failures, not fused).
        """
        if target not in self._stats:
            raise KeyError(target)
        if len(self._order) == 1:
            raise ValueError("cannot remove the last target of an upstream")
        self._order.remove(target)
        del self._stats[target]
        del self._current[target]
        self._next %= len(self._order)
        self._rebuild_ring()

    def stats(self) -> dict[T, AddressStats]:
        """Per-address statistics (live objects; do not modify)."""
        return dict(self._stats)

    def _rebuild_ring(self) -> None:
        points: list[tuple[int, int]] = []
        for index, target in enumerate(self._order):
            ident = repr(target)
            for i in range(_VNODES * self._stats[target].weight):
                points.append((_ring_hash(f"{ident}#{i}"), index))
        points.sort()
        self._ring = [p for p, _ in points]
        self._ring_owner = [self._order[i] for _, i in points]

    # -- selection -----------------------------------------------------------

    def _available(self, target: T, now: float) -> bool:
        st = self._stats[target]
        if st.fused_until is None:
            return True
        # Fused: only one half-open trial once the fuse time has passed.
        return now >= st.fused_until and not st.trial

    def choose(self, key: object = None, exclude: Iterable[T] = ()) -> UpstreamAttempt[T]:
        """Pick the address for one session attempt and count it as in flight.

        The client calls this for each attempt, with the call's ``key=`` and
        the addresses already tried in the session; you need it only to drive
        an upstream without a :class:`Client`. Settle the attempt it returns
        (:meth:`UpstreamAttempt.settle`) when the attempt ends.

        Raises:
            UpstreamUnavailable: every address is fused (or already tried).
            ValueError: a ``consistent_hash`` upstream was given no ``key``.
        """
        excluded = set(exclude)
        eligible = self._eligible(excluded)
        if not eligible:
            fused = sum(1 for st in self._stats.values() if st.fused_until is not None)
            raise UpstreamUnavailable(
                f"no address of the upstream is available ({fused} of {len(self._order)} "
                f"fused, {len(excluded)} already tried in this session)"
            )
        target = self._pick(eligible, key)
        st = self._stats[target]
        trial = st.fused_until is not None
        if trial:
            st.trial = True
        st.sessions += 1
        st.in_flight += 1
        return UpstreamAttempt(self, target, st, trial)

    def _eligible(self, excluded: set[T]) -> list[T]:
        now = trio.current_time()
        return [t for t in self._order if t not in excluded and self._available(t, now)]

    def can_choose(self, exclude: Iterable[T] = ()) -> bool:
        """Whether :meth:`choose` would find an address now (it changes nothing).

        The client asks before a retry, so that a retry with nowhere to go
        never replaces the real error with :class:`UpstreamUnavailable`.
        """
        return bool(self._eligible(set(exclude)))

    def _pick(self, eligible: list[T], key: object) -> T:
        stats = self._stats
        if len(eligible) == 1:
            return eligible[0]
        if self.policy == "weighted_random":
            return random.choices(eligible, weights=[stats[t].weight for t in eligible])[0]
        if self.policy == "least_connections":
            return min(eligible, key=lambda t: stats[t].in_flight / stats[t].weight)
        if self.policy == "consistent_hash":
            return self._pick_hashed(eligible, key)
        if all(stats[t].weight == 1 for t in eligible):
            # Plain rotation over the full order, skipping what is not eligible.
            allowed = set(eligible)
            for _ in range(len(self._order)):
                candidate = self._order[self._next % len(self._order)]
                self._next = (self._next + 1) % len(self._order)
                if candidate in allowed:
                    return candidate
            return eligible[0]  # pragma: no cover - eligible is a subset of the order
        # Smooth weighted round robin: even spacing, exact proportions.
        total = 0
        best = eligible[0]
        for t in eligible:
            self._current[t] += stats[t].weight
            total += stats[t].weight
            if self._current[t] > self._current[best]:
                best = t
        self._current[best] -= total
        return best

    def _pick_hashed(self, eligible: list[T], key: object) -> T:
        if key is None:
            raise ValueError("a consistent_hash upstream needs key= on each call")
        point = _ring_hash(key if isinstance(key, str) else repr(key))
        allowed = set(eligible)
        start = bisect.bisect_left(self._ring, point)
        size = len(self._ring)
        # Walk clockwise to the first eligible owner: an unavailable address's
        # keys spread over the others instead of all landing on one neighbour.
        for step in range(size):
            owner = self._ring_owner[(start + step) % size]
            if owner in allowed:
                return owner
        return eligible[0]  # pragma: no cover

    def _settle(self, st: AddressStats, trial: bool, ok: bool | None) -> None:
        """An attempt counted on the entry ``st`` ended (see :meth:`UpstreamAttempt.settle`).

        ``st`` may be an entry removed meanwhile: it is settled all the same,
        and no longer consulted by any selection.
        """
        st.in_flight -= 1
        if trial:
            # Only the trial itself ends the half-open state: an attempt
            # that started before the fuse blew is not the trial.
            st.trial = False
        if ok is None:
            return
        if ok:
            st.consecutive_failures = 0
            st.fused_until = None
            return
        st.failures += 1
        st.consecutive_failures += 1
        if trial or st.consecutive_failures >= self.max_fails:
            st.fused_until = trio.current_time() + self.fuse_time

    def __repr__(self) -> str:
        return f"<Upstream {self.policy} of {len(self._order)} targets>"
