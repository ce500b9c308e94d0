"""The addresses of a named target: its answer, its fuses, where a new connection goes.

A :class:`~triocomm.Target` whose host is a name (or a :meth:`Target.srv`
service name) has one :class:`TargetAddresses` in the client. It keeps the
resolver's last answer (a :class:`Resolution`) and asks again only when a new
connection is needed and that answer has expired. It keeps one fuse per
address, with the very state machine of :class:`Upstream` (an ``Upstream`` of
the addresses, never asked to choose by policy: this module chooses and hands
it the one address it may pick). It orders the addresses for a new
connection: not yet tried in this session first, then lowest SRV priority,
then fewest connections being opened or in use (per unit of SRV weight),
then fewest open, then the one picked least recently. The pool
(``_pool.py``) keeps the connections and the per-address counts; this module
does no I/O but the resolver's.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import trio

from ._errors import ConnectError, UpstreamUnavailable
from ._resolve import (
    DnsResolver,
    Resolution,
    Resolver,
    SrvRecord,
    SrvResolver,
    resolve_with_expiry,
)
from ._upstream import Upstream, UpstreamAttempt

__all__ = ["Address", "TargetAddresses", "resolve_srv_with_expiry"]

#: An address of a target: ``(ip, port)``, or ``(host, port)`` of an SRV record.
Address = tuple[str, int]


async def resolve_srv_with_expiry(resolver: SrvResolver, name: str) -> Resolution[SrvRecord]:
    """The SRV records of ``name``, with when to ask again.

    A :class:`DnsResolver` tells its answer's expiry; the answer of another
    resolver with ``resolve_srv`` is taken as expiring at once.
    """
    if isinstance(resolver, DnsResolver):
        return await resolver.lookup_srv(name)
    records = tuple(await resolver.resolve_srv(name))
    now = trio.current_time()
    return Resolution(name, records, now, now, 0.0)


class TargetAddresses:
    """The current addresses of one named target, their fuses, and the choice among them.

    Args:
        name: the target as text (``host:port``, or the SRV name), for errors.
        host: the name to resolve.
        port: the port of every address (0 for SRV, whose records carry theirs).
        srv: ``host`` is an SRV service name.
        max_fails: consecutive failed connects that fuse an address.
        fuse_time: seconds an address stays fused before one trial connect.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        srv: bool,
        max_fails: int,
        fuse_time: float,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.srv = srv
        self._max_fails = max_fails
        self._fuse_time = fuse_time
        self._answer: Resolution[Any] | None = None
        self._fuses: Upstream[Address] | None = None
        # address -> (priority, weight, position in the answer)
        self.ranks: dict[Address, tuple[int, int, int]] = {}
        # address -> when it was last picked (a count), so that ties rotate.
        self._picked: dict[Address, int] = {}
        self._picks = 0

    @property
    def addresses(self) -> list[Address]:
        """The addresses of the current answer, in its order (empty before the first)."""
        return list(self.ranks)

    def expired(self) -> bool:
        """Whether a new connection must look the name up first."""
        return self._answer is None or self._answer.expired()

    async def refresh(self, resolver: Resolver) -> bool:
        """Look the name up; True if the answer was taken (the caller updates the pool).

        Raises:
            ConnectError: the resolver failed (its ``OSError`` chained), or
                gave no address.
        """
        answer: Resolution[Any]
        try:
            if self.srv:
                assert isinstance(resolver, SrvResolver)  # checked when the target is first used
                answer = await resolve_srv_with_expiry(resolver, self.host)
            else:
                answer = await resolve_with_expiry(resolver, self.host, self.port)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {self.name}: {exc}", address=self.name) from exc
        if not answer.records:
            raise ConnectError(f"cannot resolve {self.name}: no address", address=self.name)
        old = self._answer
        if old is not None and answer.resolved_at < old.resolved_at:
            return False  # a slower lookup landed after a newer one
        self._answer = answer
        self._take(answer)
        return True

    def _take(self, answer: Resolution[Any]) -> None:
        ranks: dict[Address, tuple[int, int, int]] = {}
        for index, record in enumerate(answer.records):
            if self.srv:
                host, port, priority, weight = record
                ranks.setdefault((host, port), (priority, weight, index))
            else:
                ranks.setdefault(record, (0, 1, index))
        fuses = self._fuses
        if fuses is None:
            self._fuses = Upstream(ranks, max_fails=self._max_fails, fuse_time=self._fuse_time)
        else:
            known = set(fuses.targets)
            for address in ranks:
                if address not in known:
                    fuses.add(address)
            for address in known - ranks.keys():
                fuses.remove(address)  # an address dropped and added back starts afresh
        self.ranks = ranks
        self._picked = {a: n for a, n in self._picked.items() if a in ranks}

    def connecting(self) -> dict[Address, int]:
        """Connects under way per address (counted by the fuses' attempts)."""
        if self._fuses is None:
            return {}
        return {address: st.in_flight for address, st in self._fuses.stats().items()}

    def candidates(
        self, load: Mapping[object, tuple[int, int]], avoid: Collection[object]
    ) -> list[Address]:
        """The unfused addresses, best first for a new connection.

        ``load`` is the pool's ``address -> (opening or in use, open)``;
        ``avoid`` the addresses this session already tried.
        """
        fuses = self._fuses
        if fuses is None:
            return []
        connecting = self.connecting()
        everything = set(self.ranks)

        def preference(address: Address) -> tuple[bool, int, float, int, int, int]:
            busy, opened = load.get(address, (0, 0))
            busy += connecting.get(address, 0)
            priority, weight, index = self.ranks[address]
            # Weight 0 (RFC 2782: "very small chance") is used when its load is nil.
            share = busy / weight if weight else (0.0 if busy == 0 else math.inf)
            picked = self._picked.get(address, -1)
            return (address in avoid, priority, share, opened, picked, index)

        usable = [a for a in self.ranks if fuses.can_choose(everything - {a})]
        return sorted(usable, key=preference)

    def begin(self, address: Address) -> UpstreamAttempt[Address] | None:
        """Start a connect to ``address``; None if it was fused meanwhile.

        Settle the attempt with True (connected), False (the connect failed)
        or None (cancelled).
        """
        fuses = self._fuses
        if fuses is None or address not in self.ranks:
            return None
        try:
            attempt = fuses.choose(None, set(self.ranks) - {address})
        except UpstreamUnavailable:
            return None
        self._picks += 1
        self._picked[address] = self._picks
        return attempt

    def fused(self) -> int:
        """How many addresses are fused now."""
        if self._fuses is None:
            return 0
        return sum(1 for st in self._fuses.stats().values() if st.fused_until is not None)
