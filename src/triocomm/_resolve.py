"""Name resolution: the ``Resolver`` protocol and the caching resolvers.

A resolver turns a host name into addresses (and, for DNS, a service name
into SRV records). :class:`CachingResolver` asks the system's
``getaddrinfo``; :class:`DnsResolver` asks given DNS servers through
dnspython (the optional extra ``triocomm[dns]``). Both keep their answers in
an :class:`AnswerCache` and share its rules, written once in
:meth:`CachingResolver._answer`:

* an answer is reused until its TTL runs out (:class:`Resolution` says when);
* one lookup per name runs at a time, and every asker waits for it;
* the lookup runs in the resolver's own nursery, not in an asker's task, so a
  cancelled asker stops waiting without cancelling the others' lookup, and no
  lookup outlives the resolver's ``async with`` block;
* a refresh that fails for a passing reason (a timeout, a server failure)
  serves the previous answer, marked stale; one that says the name no longer
  exists drops it;
* at most ``max_names`` answers are kept; the least recently used goes first.

A name that does not resolve raises :class:`socket.gaierror` (an
:class:`OSError`) naming the name and the reason; the client turns it into a
:class:`~triocomm.ConnectError`, as it does any ``OSError`` of a connect.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import socket
import types
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

import trio

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "AnswerCache",
    "CachingResolver",
    "DnsResolver",
    "Resolution",
    "Resolver",
    "SrvResolver",
    "is_numeric_host",
    "resolve_with_expiry",
]

RecordT = TypeVar("RecordT")
Address = tuple[str, int]
#: (target, port, priority, weight)
SrvRecord = tuple[str, int, int, int]
#: Looks a name up: its records, and their TTL (``None``: the source gives none).
Query = Callable[[str], Awaitable[tuple[tuple[RecordT, ...], "float | None"]]]

#: After a failed refresh, a stale answer is served this long (at most its
#: TTL) before the next asker tries again, so that askers do not each wait
#: for a failing lookup.
STALE_RETRY = 5.0
# getaddrinfo's answers that say the name has no address, as opposed to a
# lookup that could not finish (EAI_AGAIN, EAI_FAIL, a timeout).
_NO_DATA: int = getattr(socket, "EAI_NODATA", socket.EAI_NONAME)  # glibc has it, not everyone
_NO_SUCH_NAME = frozenset((socket.EAI_NONAME, _NO_DATA))


@runtime_checkable
class Resolver(Protocol):
    """What a client needs to turn a host name into addresses.

    Write one to resolve names your own way (a service registry, a static
    table); the built-in ones are :class:`CachingResolver` (the default) and
    :class:`DnsResolver`. A resolver may also define ``async def
    resolve_srv(self, name: str) -> list[tuple[str, int, int, int]]``,
    returning SRV records as ``(target, port, priority, weight)``; only such a
    resolver can find an SRV target.
    """

    async def resolve(self, host: str, port: int) -> list[Address]:
        """Return the ``(ip, port)`` addresses of ``host``, best first.

        Raise :class:`OSError` (usually :class:`socket.gaierror`) if the name
        does not resolve; the client turns it into a
        :class:`~triocomm.ConnectError`.
        """
        ...


@runtime_checkable
class SrvResolver(Resolver, Protocol):
    """A :class:`Resolver` that also finds SRV records."""

    async def resolve_srv(self, name: str) -> list[SrvRecord]:
        """Return the SRV records of ``name`` as ``(target, port, priority, weight)``."""
        ...


@dataclasses.dataclass(frozen=True)
class Resolution(Generic[RecordT]):
    """One answer for a name, with the times that say when to ask again.

    Times are on Trio's clock (:func:`trio.current_time`), so a test's
    :class:`trio.testing.MockClock` moves them.

    Attributes:
        name: the name that was looked up.
        records: the addresses ``(ip, port)``, or the SRV records
            ``(target, port, priority, weight)``: addresses in the order the
            source gave, SRV records by priority, then heaviest weight first.
        resolved_at: when the source gave this answer.
        expires_at: when to look the name up again: ``resolved_at + ttl``, or
            for a stale answer the time of the next try; ``inf`` for a numeric
            address, which never needs a lookup.
        ttl: the answer's time to live in seconds (the resolver's ``ttl``, or
            the records' own TTL).
        stale: ``True`` if the last refresh failed and this is the answer
            from before it.
    """

    name: str
    records: tuple[RecordT, ...]
    resolved_at: float
    expires_at: float
    ttl: float
    stale: bool = False

    def age(self) -> float:
        """Seconds since the source gave this answer."""
        return trio.current_time() - self.resolved_at

    def expired(self) -> bool:
        """Whether the answer is due to be looked up again."""
        return trio.current_time() >= self.expires_at


class _Flight(Generic[RecordT]):
    """One lookup under way, and what its askers get when it lands."""

    __slots__ = ("answer", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Resolution[RecordT] | None = None
        self.error: OSError | None = None


class AnswerCache(Generic[RecordT]):
    """The answers to one kind of question, by name, and the lookups under way.

    At most ``max_names`` answers are kept; the least recently used is dropped
    first. The cache decides nothing about when to look up: the resolver asks
    it for a fresh answer, starts a flight when there is none, and lands the
    flight with records or an error.
    """

    def __init__(self, max_names: int) -> None:
        self._answers: OrderedDict[str, Resolution[RecordT]] = OrderedDict()
        self._flights: dict[str, _Flight[RecordT]] = {}
        self._max_names = max_names

    def __len__(self) -> int:
        return len(self._answers)

    def fresh(self, name: str) -> Resolution[RecordT] | None:
        """The answer for ``name`` if it has not expired (and mark it used)."""
        answer = self._answers.get(name)
        if answer is None or answer.expired():
            return None
        self._answers.move_to_end(name)
        return answer

    def join(self, name: str) -> tuple[_Flight[RecordT], bool]:
        """The lookup under way for ``name``, and whether it is new (start it)."""
        flight = self._flights.get(name)
        if flight is not None:
            return flight, False
        flight = self._flights[name] = _Flight()
        return flight, True

    def land(
        self, name: str, flight: _Flight[RecordT], records: tuple[RecordT, ...], ttl: float
    ) -> None:
        """The lookup found ``records``: keep them for ``ttl`` seconds."""
        now = trio.current_time()
        flight.answer = Resolution(name, records, now, now + ttl, ttl)
        self._answers[name] = flight.answer
        self._answers.move_to_end(name)
        while len(self._answers) > self._max_names:
            self._answers.popitem(last=False)

    def fail(self, name: str, flight: _Flight[RecordT], error: OSError) -> None:
        """The lookup failed: keep serving the old answer, unless the name is gone."""
        flight.error = error
        old = self._answers.get(name)
        if old is None:
            return
        if isinstance(error, socket.gaierror) and error.errno in _NO_SUCH_NAME:
            del self._answers[name]
            return
        retry = trio.current_time() + min(STALE_RETRY, old.ttl)
        flight.answer = dataclasses.replace(old, expires_at=retry, stale=True)
        self._answers[name] = flight.answer

    def finish(self, name: str, flight: _Flight[RecordT]) -> None:
        """The lookup is over (landed, failed or cancelled): wake its askers."""
        if self._flights.get(name) is flight:
            del self._flights[name]
        flight.done.set()


def is_numeric_host(host: str) -> bool:
    """Is ``host`` an IP address (no lookup needed)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_settings(ttl: float | None, timeout: float, max_names: int) -> None:
    if ttl is not None and not (0 <= ttl < math.inf):
        raise ValueError(f"ttl must be a finite number of seconds >= 0, not {ttl!r}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
    if max_names < 1:
        raise ValueError(f"max_names must be at least 1, not {max_names!r}")


class CachingResolver:
    """Resolves names with the system's ``getaddrinfo`` and keeps the answers.

    The default resolver of a client. It returns IPv4 and IPv6 addresses in
    the order ``getaddrinfo`` sorts them, and a numeric host (``"10.0.0.7"``,
    ``"::1"``) as it is, without a lookup. An answer is reused for ``ttl``
    seconds (``getaddrinfo`` does not tell the records' own TTLs; ``0``
    looks up every time). Concurrent askers for the same name share one
    lookup. A refresh that fails for a passing reason (no answer within
    ``timeout``, ``EAI_AGAIN``) serves the previous answer, marked stale, and
    is tried again by the first asker after 5 seconds (or ``ttl``, if
    shorter); a refresh that says the name does not exist (``EAI_NONAME``)
    drops the answer. At most ``max_names`` answers are kept.

    Its lookups run in a nursery of its own, so enter it before use::

        async with triocomm.CachingResolver(ttl=30) as resolver:
            print(await resolver.resolve("localhost", 8080))

    Leaving the block cancels the lookups still under way; the cached answers
    remain, and the resolver may be entered again.

    Raises:
        ValueError: ``ttl`` or ``timeout`` is negative or infinite, or
            ``max_names`` is below 1.
    """

    def __init__(self, ttl: float = 60.0, *, timeout: float = 10.0, max_names: int = 1024) -> None:
        self._setup(ttl, timeout, max_names)

    def _setup(self, ttl: float | None, timeout: float, max_names: int) -> None:
        _check_settings(ttl, timeout, max_names)
        # None: each answer lives for the TTL its records carry (DnsResolver).
        self._ttl = ttl
        self._timeout = timeout
        self._addresses: AnswerCache[str] = AnswerCache(max_names)
        self._nursery: trio.Nursery | None = None
        # trio's NurseryManager has no public type.
        self._nursery_manager: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ttl={self._ttl!r})"

    async def __aenter__(self) -> Self:
        if self._nursery is not None:
            raise RuntimeError(f"{self!r} is already running (enter it once)")
        manager = trio.open_nursery()
        # No checkpoint between entering the nursery and returning: a cancel
        # there would leave it entered.
        self._nursery = await manager.__aenter__()
        self._nursery_manager = manager
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> bool:
        nursery, manager = self._nursery, self._nursery_manager
        assert nursery is not None, "not entered"
        # Lookups that nobody waits for any more end with the resolver.
        nursery.cancel_scope.cancel()
        try:
            # The body's exception is not handed to the nursery (it would come
            # out wrapped in an ExceptionGroup); the lookup tasks never raise.
            await manager.__aexit__(None, None, None)
        finally:
            self._nursery = self._nursery_manager = None
        return False

    @property
    def cached_names(self) -> int:
        """How many host names have addresses in the cache, fresh or stale (<= ``max_names``)."""
        return len(self._addresses)

    async def resolve(self, host: str, port: int) -> list[Address]:
        """Return the ``(ip, port)`` addresses of ``host``, from the cache if fresh.

        Raises:
            socket.gaierror: the name does not resolve (the message names it
                and says why), or no answer came within ``timeout``.
            ValueError: ``host`` is empty or ``port`` is not in 0..65535.
            RuntimeError: the resolver is not running (enter it with
                ``async with``).
        """
        return list((await self.lookup(host, port)).records)

    async def lookup(self, host: str, port: int) -> Resolution[Address]:
        """Like :meth:`resolve`, but return the whole :class:`Resolution`.

        Its ``expires_at`` says when the addresses are due for a new lookup,
        and ``stale`` whether they are served after a failed refresh.
        """
        if not host:
            raise ValueError("host must not be empty")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, not {port!r}")
        if is_numeric_host(host):
            await trio.lowlevel.checkpoint()
            now = trio.current_time()
            return Resolution(host, ((host, port),), now, math.inf, math.inf)
        # One answer per name, whatever the port: the port is the asker's.
        answer = await self._answer(self._addresses, host.lower(), self._query_addresses)
        records = tuple((ip, port) for ip in answer.records)
        return Resolution(
            answer.name, records, answer.resolved_at, answer.expires_at, answer.ttl, answer.stale
        )

    async def _query_addresses(self, host: str) -> tuple[tuple[str, ...], float | None]:
        """Ask ``getaddrinfo`` for the IPv4 and IPv6 addresses of ``host``."""
        try:
            infos = await trio.socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise socket.gaierror(
                error.errno, f"cannot resolve {host!r}: {error.strerror}"
            ) from error
        except UnicodeError as error:  # the IDNA codec refuses the name (a label too long)
            raise socket.gaierror(socket.EAI_NONAME, f"cannot resolve {host!r}: {error}") from error
        # One entry per address: getaddrinfo may repeat one per protocol.
        ips = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        if not ips:
            raise socket.gaierror(socket.EAI_NONAME, f"cannot resolve {host!r}: no address")
        return ips, None

    async def _answer(
        self, cache: AnswerCache[RecordT], name: str, query: Query[RecordT]
    ) -> Resolution[RecordT]:
        """The answer for ``name``: from ``cache`` if fresh, else from the one lookup."""
        if self._nursery is None:
            raise RuntimeError(
                f"{self!r} is not running: use it as `async with {type(self).__name__}(...)`"
            )
        answer = cache.fresh(name)
        if answer is not None:
            await trio.lowlevel.checkpoint()
            return answer
        flight, new = cache.join(name)
        if new:
            self._nursery.start_soon(self._look_up, cache, name, query, flight)
        # Only this task's wait is cancelled with it; the lookup goes on.
        await flight.done.wait()
        if flight.answer is not None:
            return flight.answer
        if flight.error is not None:
            # Each asker raises its own copy: one exception object raised in
            # several tasks would collect all their tracebacks.
            error = copy.copy(flight.error)
            raise error from flight.error.__cause__
        raise RuntimeError(f"{self!r} was closed while it looked up {name!r}")

    async def _look_up(
        self,
        cache: AnswerCache[RecordT],
        name: str,
        query: Query[RecordT],
        flight: _Flight[RecordT],
    ) -> None:
        try:
            with trio.move_on_after(self._timeout):
                records, record_ttl = await query(name)
                ttl = self._ttl if self._ttl is not None else record_ttl
                cache.land(name, flight, records, 0.0 if ttl is None else ttl)
                return
            message = f"cannot resolve {name!r}: no answer within {self._timeout:g}s"
            cache.fail(name, flight, socket.gaierror(socket.EAI_AGAIN, message))
        except OSError as error:
            cache.fail(name, flight, error)
        except Exception as error:
            # A lookup task must not crash the resolver's nursery (and every
            # task beside it): its askers get the error, with its cause.
            failure = socket.gaierror(socket.EAI_FAIL, f"cannot resolve {name!r}: {error!r}")
            failure.__cause__ = error
            cache.fail(name, flight, failure)
        finally:
            cache.finish(name, flight)


def _dnspython() -> types.ModuleType:
    """Import dnspython's async resolver on first use: ``import triocomm`` never needs it."""
    try:
        import dns.asyncbackend
        import dns.asyncresolver
        import dns.exception
        import dns.name
        import dns.nameserver
        import dns.rdatatype
        import dns.rdtypes.IN.SRV
        import dns.resolver
    except ImportError as error:
        raise ImportError(
            "triocomm.DnsResolver needs dnspython: install the extra, "
            "python3 -m pip install 'triocomm[dns]'"
        ) from error
    try:
        dns.asyncbackend.get_backend("trio")
    except ImportError as error:
        import dns.version

        raise ImportError(
            f"dnspython {dns.version.version} refuses trio {trio.__version__} for its trio "
            f"backend ({error}): upgrade trio, or use an older dnspython"
        ) from error
    return dns


def _nameserver(server: str | tuple[str, int]) -> tuple[str, int]:
    ip, port = (server, 53) if isinstance(server, str) else server
    if not isinstance(ip, str) or not is_numeric_host(ip):
        raise ValueError(f"a name server is an IP address, or (IP address, port), not {server!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f"a name server's port must be in 1..65535, not {server!r}")
    return ip, port


class DnsResolver(CachingResolver):
    """Resolves names by asking the given DNS servers directly, through dnspython.

    Needs the optional extra ``triocomm[dns]`` (dnspython); without it the
    constructor raises :class:`ImportError` naming the extra. A name server
    is ``"ip"`` (port 53) or ``("ip", port)``; the servers are asked in
    order, each until one answers, over UDP (TCP when an answer is
    truncated). Nothing from the system is used: no ``/etc/hosts``, no
    ``resolv.conf``, no search domains.

    :meth:`resolve` asks for A and AAAA records at once and returns the IPv4
    addresses, then the IPv6 ones. :meth:`resolve_srv` returns SRV records.
    Each answer is kept for the TTL its records carry (the shortest of them),
    or for ``ttl`` seconds if given. Everything else is as for
    :class:`CachingResolver`: one lookup per name at a time, stale answers
    when a refresh fails for a passing reason (a timeout, ``SERVFAIL``),
    ``max_names`` answers of each kind; ``NXDOMAIN`` and an empty answer
    drop the name. Enter it with ``async with`` before use.

    Raises:
        ImportError: dnspython is missing (or too old for the installed trio).
        ValueError: no name server, a name server that is not an IP address,
            or a bad ``ttl``, ``timeout`` or ``max_names``.
    """

    def __init__(
        self,
        nameservers: Sequence[str | tuple[str, int]],
        *,
        ttl: float | None = None,
        timeout: float = 5.0,
        max_names: int = 1024,
    ) -> None:
        if isinstance(nameservers, str) or not nameservers:
            raise ValueError(f"nameservers must be a non-empty list, not {nameservers!r}")
        self._setup(ttl, timeout, max_names)
        self._servers = [_nameserver(server) for server in nameservers]
        self._dns: Any = _dnspython()
        self._stub = self._dns.asyncresolver.Resolver(configure=False)
        self._stub.nameservers = [
            self._dns.nameserver.Do53Nameserver(ip, port) for ip, port in self._servers
        ]
        self._stub.lifetime = timeout
        self._backend = self._dns.asyncbackend.get_backend("trio")
        self._srv: AnswerCache[SrvRecord] = AnswerCache(max_names)

    def __repr__(self) -> str:
        servers = ", ".join(f"{ip}:{port}" for ip, port in self._servers)
        return f"DnsResolver([{servers}], ttl={self._ttl!r})"

    async def resolve_srv(self, name: str) -> list[SrvRecord]:
        """Return the SRV records of ``name`` as ``(target, port, priority, weight)``.

        ``name`` is the service's name, such as ``"_redis._tcp.example.com"``.
        The records are sorted by priority, then by weight (heaviest first);
        targets have no final dot.

        Raises:
            socket.gaierror: no such name, no SRV record, only the "service
                not offered" record (target ``.``), or no answer in time.
        """
        return list((await self.lookup_srv(name)).records)

    async def lookup_srv(self, name: str) -> Resolution[SrvRecord]:
        """Like :meth:`resolve_srv`, but return the whole :class:`Resolution`."""
        if not name:
            raise ValueError("name must not be empty")
        return await self._answer(self._srv, name.lower(), self._query_srv)

    async def _query_addresses(self, host: str) -> tuple[tuple[str, ...], float | None]:
        """Ask for the A and AAAA records of ``host`` at once."""
        answers: dict[str, tuple[list[Any], float] | socket.gaierror] = {}

        async def ask(rdtype: str) -> None:
            answers[rdtype] = await self._ask(host, rdtype)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, "A")
            nursery.start_soon(ask, "AAAA")
        ips: list[str] = []
        ttls: list[float] = []
        failures: list[socket.gaierror] = []
        for rdtype in ("A", "AAAA"):  # IPv4 first, in the servers' order
            answer = answers[rdtype]
            if isinstance(answer, socket.gaierror):
                failures.append(answer)
                continue
            ips += (rdata.to_text() for rdata in answer[0])
            ttls.append(answer[1])
        if not ips:
            failures = failures or [
                socket.gaierror(_NO_DATA, f"cannot resolve {host!r}: no address")
            ]
            # A passing failure of one family is no proof that the name is gone.
            passing = [error for error in failures if error.errno not in _NO_SUCH_NAME]
            raise (passing or failures)[0]
        return tuple(ips), min(ttls)

    async def _query_srv(self, name: str) -> tuple[tuple[SrvRecord, ...], float | None]:
        answer = await self._ask(name, "SRV")
        if isinstance(answer, OSError):
            raise answer
        rdatas, ttl = answer
        root = self._dns.name.root
        records = [
            (rdata.target.to_text(omit_final_dot=True), rdata.port, rdata.priority, rdata.weight)
            for rdata in rdatas
            if rdata.target != root
        ]
        if not records:
            message = f"cannot resolve {name!r}: the service is not offered (SRV target '.')"
            raise socket.gaierror(socket.EAI_NONAME, message)
        records.sort(key=lambda r: (r[2], -r[3], r[0], r[1]))
        return tuple(records), ttl

    async def _ask(self, name: str, rdtype: str) -> tuple[list[Any], float] | socket.gaierror:
        """One question to the servers: its records and TTL, or the error it ended in."""
        dns = self._dns
        where = f"{name!r} ({rdtype}) via {', '.join(f'{i}:{p}' for i, p in self._servers)}"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as error:  # an empty label, a label too long
            return socket.gaierror(socket.EAI_NONAME, f"{name!r} is not a valid name: {error}")
        try:
            answer = await self._stub.resolve(qname, rdtype, search=False, backend=self._backend)
        except dns.resolver.NXDOMAIN:
            return socket.gaierror(socket.EAI_NONAME, f"cannot resolve {where}: no such name")
        except dns.resolver.NoAnswer:
            return socket.gaierror(_NO_DATA, f"cannot resolve {where}: no {rdtype} record")
        except dns.exception.DNSException as error:
            # A timeout, or SERVFAIL or REFUSED from every server: a passing failure.
            return socket.gaierror(socket.EAI_AGAIN, f"cannot resolve {where}: {error}")
        return list(answer.rrset), float(answer.rrset.ttl)


async def resolve_with_expiry(resolver: Resolver, host: str, port: int) -> Resolution[Address]:
    """The addresses of ``host`` from any resolver, with when to ask again.

    A :class:`CachingResolver` (or :class:`DnsResolver`) tells its answer's
    expiry; the answer of another :class:`Resolver` is taken as expiring at
    once, so whoever keeps it asks that resolver again next time (it may
    cache by itself).
    """
    if isinstance(resolver, CachingResolver):
        return await resolver.lookup(host, port)
    records = tuple(await resolver.resolve(host, port))
    now = trio.current_time()
    return Resolution(host, records, now, now, 0.0)
