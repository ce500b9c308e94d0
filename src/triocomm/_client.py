"""The client: targets, ``open_client`` and the session API.

A :class:`Target` says where to connect and how to speak (codec, TLS,
time limits, pool size, a handshake). :func:`open_client` opens a
:class:`Client`, whose nursery holds one task per connection; a keep-alive
pool per target (``_pool.py``) lends those connections to sessions.

A *session* runs in its caller's task: it borrows a connection, sends and
receives under the per-phase limits of :class:`Timeouts` (applied inside
:class:`Connection`), and gives the connection back only if it ended cleanly
with nothing unread. Anything else (an error, a timeout, a cancellation)
closes the connection, so a late reply can never be read by the next session.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import trio

from ._addresses import Address, TargetAddresses
from ._connection import Connection, Idle, PhaseLimit
from ._errors import CommError, CommTimeout, ConnectError, ConnectionLost, UpstreamUnavailable
from ._idle import IdleWatch, check_idle_options
from ._keepalive import check_tcp_keepalive, set_tcp_keepalive
from ._observe import Observer, ObserverSet
from ._pool import KeepAlivePool, PooledConnection, PoolStats
from ._resolve import (
    CachingResolver,
    Resolver,
    SrvResolver,
    is_numeric_host,
    resolve_with_expiry,
)
from ._retry import (
    RetryKind,
    RetryPolicy,
    RetryWindow,
    SessionAttempts,
    as_policy,
    connect_failure_kind,
    session_failure_kind,
)
from ._timeouts import Limits, Timeouts, session_limits
from ._timers import Timers
from ._udp import UdpExchanges, check_udp_target
from ._upstream import Upstream, UpstreamAttempt

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    from ._framing import Codec

    PosArgs = TypeVarTuple("PosArgs")

__all__ = ["Client", "Target", "open_client"]

logger = logging.getLogger("triocomm.client")

In = TypeVar("In")
Out = TypeVar("Out")
R = TypeVar("R")

_DEFAULT_TIMEOUTS = Timeouts()
# Pools a client keeps before it drops those of targets it has no connection
# to (see Client._pool): a client that meets ever new targets stays bounded.
_POOLS_KEPT = 1024
_INF = math.inf
# The pause after a failed background connect (Target.min_idle): it doubles
# from the first value to the second while the connects keep failing.
_SPARE_PAUSE_MIN = 0.5
_SPARE_PAUSE_MAX = 30.0


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    """The context behind ``ssl_context=True``: verifies chain and host name."""
    return ssl.create_default_context()


@dataclass(frozen=True)
class Target(Generic[In, Out]):
    """Where a client connects, and how it talks there.

    ``Target(host, port, codec)`` is a TCP address: ``host`` is a name, an
    IPv4 address or an IPv6 address (``"::1"``; brackets are accepted and
    dropped). A name is resolved through the client's resolver
    (``open_client(resolver=)``), and a name with several addresses gets one
    pool per address under the one target (see ``max_fails``).
    ``Target.unix(path, codec)`` is a Unix socket; ``Target.udp(host, port,
    codec)`` a UDP address; ``Target.srv(name, codec)`` a service found
    through SRV records.

    Args:
        host: host name or address literal.
        port: TCP port (0 on a Unix-socket target, which has none).
        codec: how messages are framed, e.g. ``LengthPrefixed()``. It must be
            hashable (the built-in codecs are).
        ssl_context: speak TLS with this context. ``True`` means the
            system's default context (``ssl.create_default_context()``, one
            shared instance, so equal targets still share a pool): it verifies
            the certificate chain *and* the host name. For a private CA pass
            your own ``ssl.create_default_context(cafile=...)``. Nothing is
            disabled for you; a context that skips verification must be built
            on purpose.
        server_hostname: the name to verify the certificate against and to
            send as SNI; defaults to ``host``. A Unix target with TLS needs it
            unless the context skips host name checks.
        timeouts: this target's :class:`Timeouts`; replaces the client's as a
            whole value.
        max_connections: the most connections to this target at once (open or
            being opened); further sessions wait, FIFO, up to
            ``Timeouts.pool``.
        on_connect: ``async def on_connect(conn)``, run once on every new
            connection before its first session, as the session with
            ``conn.seq == 0`` (AUTH, SELECT, protocol negotiation). If it
            raises, the connection is closed and the session gets the error.
        max_datagram: set (by :meth:`udp`) on a UDP target only: the largest
            request or reply datagram, in bytes; ``None`` on stream targets.
        health_check: ``async def check(conn)``, run before a pooled
            connection that has been idle at least ``health_check_after``
            seconds is lent (e.g. send a PING, receive the PONG). It runs as a
            session of its own (``conn.seq`` counts it), bound by the
            target's :class:`Timeouts`. If it raises, or leaves unread data,
            the connection is closed and another is taken or opened: the
            session never sees it. Counted in
            ``PoolStats.health_checks_failed``.
        health_check_after: seconds of idleness after which a connection is
            checked before it is lent (default 30).
        tcp_keepalive: seconds of silence after which the kernel sends TCP
            keep-alive probes on the connection (``SO_KEEPALIVE`` with
            ``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``, ``TCP_KEEPCNT`` where the
            platform has them; 3 probes, ``tcp_keepalive / 3`` seconds apart).
            A peer gone without a word is then found about ``2 *
            tcp_keepalive`` seconds after the connection went quiet, and an
            idle connection to it is discarded before it is lent. ``None``
            (the default) leaves the socket as it is; ignored for Unix
            sockets.
        max_lifetime: seconds after its connect at which a connection is
            closed instead of being reused (an idle one is closed then; a
            lent one when its session ends). Spreads load again after a
            deploy or a DNS change. ``None``: no limit.
        min_idle: idle connections the pool keeps open: from the first use
            of the target, connections are opened in the background (in the
            client's nursery) until this many are idle, and again when one
            is lent or closes; never beyond ``max_connections``. A failed
            background connect is tried again after a pause that doubles up
            to 30 s.
        max_fails: for a target whose host is a name: an address whose
            connects fail this many times in a row is fused (default 3):
            no connection goes there for ``fuse_time`` seconds, then one
            trial connect is let through (success ends the fuse, failure
            fuses it again), as for an :class:`Upstream` address. When every
            address is fused, a new connection fails at once with
            :class:`ConnectError`. A numeric host is never fused.
        fuse_time: seconds an address stays fused (default 10).
        srv_lookup: set by :meth:`srv` only: ``host`` is an SRV service name.

    Targets are immutable and hashable; equal targets share one pool in a
    client. ``str(target)`` is its address, as used in error messages.
    """

    host: str | None
    port: int
    codec: Codec[In, Out]
    ssl_context: ssl.SSLContext | bool | None = field(default=None, kw_only=True)
    server_hostname: str | None = field(default=None, kw_only=True)
    timeouts: Timeouts | None = field(default=None, kw_only=True)
    max_connections: int = field(default=200, kw_only=True)
    on_connect: Callable[[Connection[In, Out]], Awaitable[object]] | None = field(
        default=None, kw_only=True
    )
    path: str | None = field(default=None, kw_only=True)
    max_datagram: int | None = field(default=None, kw_only=True)
    health_check: Callable[[Connection[In, Out]], Awaitable[object]] | None = field(
        default=None, kw_only=True
    )
    health_check_after: float = field(default=30.0, kw_only=True)
    tcp_keepalive: float | None = field(default=None, kw_only=True)
    max_lifetime: float | None = field(default=None, kw_only=True)
    min_idle: int = field(default=0, kw_only=True)
    max_fails: int = field(default=3, kw_only=True)
    fuse_time: float = field(default=10.0, kw_only=True)
    srv_lookup: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.max_datagram is not None:
            check_udp_target(self.path, self.ssl_context, self.on_connect, self.max_datagram)
        if self.path is None:
            if not isinstance(self.host, str) or not self.host:
                raise TypeError(f"Target host must be a non-empty str, got {self.host!r}")
            if self.host.startswith("[") and self.host.endswith("]"):
                object.__setattr__(self, "host", self.host[1:-1])
            port = self.port
            if self.srv_lookup:
                if port != 0 or self.max_datagram is not None:
                    raise TypeError("an SRV target takes its ports from the records (port 0, TCP)")
            elif isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"Target port must be an int in 1..65535, got {port!r}")
        elif self.host is not None or self.port != 0:
            raise TypeError("a Unix socket target takes a path, not a host and port")
        if self.timeouts is not None and not isinstance(self.timeouts, Timeouts):
            raise TypeError(f"timeouts must be a Timeouts, got {self.timeouts!r}")
        if (
            isinstance(self.max_connections, bool)
            or not isinstance(self.max_connections, int)
            or self.max_connections < 1
        ):
            raise ValueError(f"max_connections must be an int >= 1, got {self.max_connections!r}")
        self._check_health_options()
        if self.ssl_context is True:
            object.__setattr__(self, "ssl_context", _default_tls_context())
        elif self.ssl_context is False:
            object.__setattr__(self, "ssl_context", None)
        if self.ssl_context is not None:
            if not isinstance(self.ssl_context, ssl.SSLContext):
                raise TypeError(f"ssl_context must be an ssl.SSLContext, got {self.ssl_context!r}")
            if (
                self.path is not None
                and self.server_hostname is None
                and self.ssl_context.check_hostname
            ):
                raise ValueError(
                    "a Unix socket target with TLS needs server_hostname= to verify "
                    "the certificate against"
                )
        hash(self)  # fail here, not inside the client, on an unhashable codec

    def _check_health_options(self) -> None:
        after = self.health_check_after
        if isinstance(after, bool) or not isinstance(after, (int, float)):
            raise TypeError(f"health_check_after must be a number of seconds, got {after!r}")
        if not 0 <= after < math.inf:
            raise ValueError(f"health_check_after must be >= 0 and finite, got {after!r}")
        if self.health_check is not None and not callable(self.health_check):
            raise TypeError(f"health_check must be an async function, got {self.health_check!r}")
        check_tcp_keepalive(self.tcp_keepalive)
        fails = self.max_fails
        if isinstance(fails, bool) or not isinstance(fails, int) or fails < 1:
            raise ValueError(f"max_fails must be an int >= 1, got {fails!r}")
        fuse = self.fuse_time
        if isinstance(fuse, bool) or not isinstance(fuse, (int, float)) or not 0 <= fuse < math.inf:
            raise ValueError(f"fuse_time must be a finite number of seconds >= 0, got {fuse!r}")
        lifetime = self.max_lifetime
        if lifetime is not None:
            if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
                raise TypeError(f"max_lifetime must be seconds or None, got {lifetime!r}")
            if not lifetime > 0:
                raise ValueError(f"max_lifetime must be > 0, got {lifetime!r}")
        min_idle = self.min_idle
        if isinstance(min_idle, bool) or not isinstance(min_idle, int) or min_idle < 0:
            raise ValueError(f"min_idle must be an int >= 0, got {min_idle!r}")
        if self.max_datagram is not None and (
            self.health_check is not None
            or self.tcp_keepalive is not None
            or self.max_lifetime is not None
            or min_idle
        ):
            raise TypeError(
                "a UDP target has no connections: health_check, tcp_keepalive, "
                "max_lifetime and min_idle do not apply"
            )
        if min_idle > self.max_connections:
            raise ValueError(
                f"min_idle ({min_idle}) must not exceed max_connections ({self.max_connections})"
            )

    @classmethod
    def unix(
        cls,
        path: str | os.PathLike[str],
        codec: Codec[In, Out],
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 200,
        on_connect: Callable[[Connection[In, Out]], Awaitable[object]] | None = None,
        health_check: Callable[[Connection[In, Out]], Awaitable[object]] | None = None,
        health_check_after: float = 30.0,
        max_lifetime: float | None = None,
        min_idle: int = 0,
    ) -> Target[In, Out]:
        """A target reached through the Unix socket at ``path``.

        Takes the same keyword options as :class:`Target`, but for
        ``tcp_keepalive``, which a Unix socket does not have.
        """
        return cls(
            None,
            0,  # a Unix socket has no port
            codec,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeouts=timeouts,
            max_connections=max_connections,
            on_connect=on_connect,
            path=os.fspath(path),
            health_check=health_check,
            health_check_after=health_check_after,
            max_lifetime=max_lifetime,
            min_idle=min_idle,
        )

    @classmethod
    def udp(
        cls,
        host: str,
        port: int,
        codec: Codec[In, Out],
        *,
        timeouts: Timeouts | None = None,
        max_connections: int = 200,
        max_datagram: int = 65507,
    ) -> Target[In, Out]:
        """A UDP target: ``client.request`` sends one datagram and returns the reply datagram.

        Each exchange runs on a connected UDP socket of its own (reused from
        a small cache only after an exchange that succeeded, and emptied of
        stray datagrams first; closed after one that failed), so a late reply
        is never taken for a later request's. ``timeouts.first_response``
        bounds the wait for the reply (1 s when it is ``None``); ``connect``
        bounds resolving the host, ``pool`` the wait for one of the
        ``max_connections`` sockets. A lost datagram raises
        :class:`CommTimeout` (phase ``"first_response"``); to resend it, pass
        ``retries=RetryPolicy(on=("timeout",))`` and ``idempotent=True``.

        A datagram is one message: ``codec.encode`` must give at most
        ``max_datagram`` bytes (default 65,507, the most IPv4 carries), else
        ``ValueError``; the reply, fed to a fresh decoder, must give exactly
        one message, else :class:`ProtocolError`. ``client.connection`` and
        ``client.run`` raise ``TypeError`` for a UDP target, and an
        ``Upstream`` cannot hold one.
        """
        return cls(
            host,
            port,
            codec,
            timeouts=timeouts,
            max_connections=max_connections,
            max_datagram=max_datagram,
        )

    @classmethod
    def srv(
        cls,
        name: str,
        codec: Codec[In, Out],
        *,
        ssl_context: ssl.SSLContext | bool | None = None,
        server_hostname: str | None = None,
        timeouts: Timeouts | None = None,
        max_connections: int = 200,
        on_connect: Callable[[Connection[In, Out]], Awaitable[object]] | None = None,
        health_check: Callable[[Connection[In, Out]], Awaitable[object]] | None = None,
        health_check_after: float = 30.0,
        tcp_keepalive: float | None = None,
        max_lifetime: float | None = None,
        min_idle: int = 0,
        max_fails: int = 3,
        fuse_time: float = 10.0,
    ) -> Target[In, Out]:
        """A TCP target found through the SRV records of ``name`` (``"_svc._tcp.example.com"``).

        The client's resolver must offer ``resolve_srv`` (a
        :class:`DnsResolver` does; the default :class:`CachingResolver`
        does not): else the first use raises ``TypeError``. Each record
        ``(host, port, priority, weight)`` gets a pool of its own: a new
        connection goes to the lowest priority whose records are not all
        fused, and within it to the record with the fewest connections in
        use per unit of weight. A record's host is resolved through the same
        resolver; TLS verifies it (unless ``server_hostname`` is given).
        Takes the keyword options of :class:`Target`.
        """
        return cls(
            name,
            0,
            codec,
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            timeouts=timeouts,
            max_connections=max_connections,
            on_connect=on_connect,
            health_check=health_check,
            health_check_after=health_check_after,
            tcp_keepalive=tcp_keepalive,
            max_lifetime=max_lifetime,
            min_idle=min_idle,
            max_fails=max_fails,
            fuse_time=fuse_time,
            srv_lookup=True,
        )

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for an IPv6 address), the SRV name, or the Unix path."""
        if self.path is not None:
            return self.path
        if self.srv_lookup:
            return self.host or ""
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address


def _tls_hostname(target: Target[Any, Any], record_host: str | None = None) -> str | None:
    """The name a TLS connection to ``target`` verifies and sends as SNI.

    ``record_host``: the host of the SRV record connected to, for an SRV target.
    """
    if target.server_hostname is not None:
        return target.server_hostname
    if target.srv_lookup:
        return record_host
    return target.host


def _start_session(conn: Connection[Any, Any], timeouts: Timeouts) -> None:
    """A client session starts on ``conn``: its seq moves on, ``timeouts`` bound it."""
    conn._begin_session(session_limits(timeouts))


def _connect_failure_text(exc: OSError) -> str:
    """The reasons behind a failed connect, for the error message.

    ``trio.open_tcp_stream`` tries every address and raises one ``OSError``
    ("all attempts ... failed") caused by a group of the real errors; the
    user needs those (refused? unreachable?), so they are spelled out.
    """
    causes = getattr(exc.__cause__, "exceptions", None)
    if not causes:
        return str(exc)
    return "; ".join(dict.fromkeys(str(cause) for cause in causes))


def _address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _open_stream(
    target: Target[Any, Any], ip: str | None = None, port: int = 0, record_host: str | None = None
) -> trio.abc.Stream:
    """Connect (and handshake) to ``target``; failures become :class:`ConnectError`.

    ``ip`` and ``port``: the one address of the target's to connect to (a
    numeric host is its own). ``record_host``: the SRV record's host, for TLS.
    """
    if ip is None:
        ip, port = target.host, target.port
    where = target.address if target.path is not None else _address_text(ip or "", port)
    try:
        if target.path is not None:
            stream: trio.SocketStream = await trio.open_unix_socket(target.path)
        else:
            assert ip is not None
            stream = await trio.open_tcp_stream(ip, port)
    except OSError as exc:
        # Refused, unreachable, unresolvable (socket.gaierror), no such path.
        raise ConnectError(
            f"cannot connect to {where}: {_connect_failure_text(exc)}", address=where
        ) from exc
    if target.tcp_keepalive is not None:
        try:
            set_tcp_keepalive(stream, target.tcp_keepalive)
        except OSError as exc:  # pragma: no cover - a socket that just connected
            stream.socket.close()
            raise ConnectError(
                f"cannot set TCP keep-alive on {where}: {exc}", address=where
            ) from exc
    context = target.ssl_context
    if not isinstance(context, ssl.SSLContext):  # None; True/False were resolved
        return stream
    try:
        tls = trio.SSLStream(
            stream,
            context,
            server_hostname=_tls_hostname(target, record_host),
            https_compatible=False,
        )
        await tls.do_handshake()
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        if isinstance(exc, (trio.BrokenResourceError, ssl.SSLError, ValueError)):
            # The SSL error (e.g. SSLCertVerificationError) is the useful cause.
            cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
            raise ConnectError(
                f"TLS handshake with {where} failed: {cause}", address=where
            ) from cause
        raise
    return tls


# Where a session goes: one target, or an Upstream that picks one per attempt.
_Dest = Target[Any, Any] | Upstream[Target[Any, Any]]
# A target, its pool, and the timeouts (and their limits) of its sessions
# when the call names none.
_Route = tuple[Target[Any, Any], KeepAlivePool, Timeouts, Limits]


def _address_failed(exc: BaseException) -> bool | None:
    """How an attempt's exception reflects on the address, for an Upstream's fuses.

    False: the address failed (could not connect, lost the connection, timed
    out, sent bad bytes). None: says nothing about it (cancelled, the pool was
    full, or the caller's own code raised).
    """
    if isinstance(exc, UpstreamUnavailable) or (
        isinstance(exc, CommTimeout) and exc.phase == "pool"
    ):
        return None
    if isinstance(exc, (CommError, trio.BrokenResourceError, trio.EndOfChannel)):
        return False
    return None


def _tried_address(avoid: list[Address] | None, entry: PooledConnection) -> list[Address] | None:
    """A session failed on ``entry``: its retry prefers another address of the name."""
    if entry.ledger is None:
        return avoid
    avoid = avoid or []
    avoid.append(entry.ledger.address)  # type: ignore[arg-type]  # the pool keeps it as object
    return avoid


class Client:
    """Sessions with targets over pooled keep-alive connections.

    Made by :func:`open_client`; valid inside its ``async with`` block. Each
    method takes the target, ``timeouts=`` (a whole :class:`Timeouts` for this
    call, beating the target's and the client's) and ``key=`` (for an
    ``Upstream`` with consistent hashing; a plain :class:`Target` ignores it).

    Sessions run in the caller's task. Errors reach the caller as themselves,
    never wrapped in an ``ExceptionGroup``.
    """

    # Made on the first request to a UDP target.
    _udp: UdpExchanges | None = None

    def __init__(
        self,
        nursery: trio.Nursery,
        timeouts: Timeouts | None,
        retries: RetryPolicy,
        observers: ObserverSet | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._nursery = nursery
        # None without observers: one test per connection event, per session.
        self._observers = observers
        # With observers: why a session closed a connection, for connection_closed.
        self._failures: dict[int, BaseException] = {}
        self._timeouts = timeouts
        self._retries = retries
        self._resolver: Resolver = CachingResolver() if resolver is None else resolver
        self._pools: dict[Target[Any, Any], KeepAlivePool] = {}
        # The addresses of the named targets among them (one pool per address).
        self._named: dict[Target[Any, Any], TargetAddresses] = {}
        # Session attempts counted outside the pools: those of dropped pools,
        # and borrows that failed before getting a connection. For the
        # retry budget, made on first use.
        self._attempts_elsewhere = 0
        self._retry_window: RetryWindow | None = None
        self._sweep_at = _POOLS_KEPT
        self._closed = False
        # Times the waiting reads of every connection (see _watchdog.py);
        # started by open_client in the client's nursery.
        self._timers = Timers()
        # The last target used, its pool, and the timeouts (with their
        # limits) its sessions get when the call names none: most programs
        # pass the same Target object every time, and an identity check is
        # cheaper than hashing a Target (and its codec) for the dict.
        self._last_route: _Route | None = None

    # -- public API ----------------------------------------------------------

    def request(
        self,
        target: Target[In, Out] | Upstream[Target[In, Out]],
        message: Out,
        *,
        timeouts: Timeouts | None = None,
        key: object = None,
        retries: int | RetryPolicy | None = None,
        idempotent: bool = False,
    ) -> Coroutine[Any, Any, In]:
        """One session: send ``message``, return the one reply (``await`` it).

        Reuses a pooled connection when there is a sound one, else opens one.
        A failed attempt is tried again as the :class:`RetryPolicy` says
        (``retries=`` for this call, else ``open_client(retries=)``; by
        default: once, on a fresh connection, when a *reused* connection was
        found closed or reset before any byte of the reply arrived). Never
        once a reply byte arrived. ``idempotent=True`` says the request may
        safely reach the peer twice, which allows the policy's ``"lost"`` and
        ``"timeout"`` retries.

        ``message`` is encoded before a connection is borrowed or opened.

        On a UDP target (:meth:`Target.udp`) the message goes out as one
        datagram on a socket of its own and the first datagram back is the
        reply; a lost one raises :class:`CommTimeout` (``"first_response"``,
        1 s unless the timeouts say otherwise), a ``"timeout"`` that a
        :class:`RetryPolicy` naming it resends when ``idempotent=True``.

        Raises:
            TypeError, ValueError, FrameTooLarge: the target's codec refused
                ``message`` (its own exception, unchanged). No connection was
                borrowed, opened or closed, and an ``Upstream`` counts no
                failure of the address.
            ConnectError: a new connection could not be made.
            CommTimeout: a limit of :class:`Timeouts` ran out (``phase`` says
                which); the connection is closed.
            ConnectionLost: the peer closed or reset the connection before the
                whole reply arrived.
            ProtocolError, FrameTooLarge: the reply was not valid for the codec
                (on a UDP target: not exactly one message).
            ValueError: on a UDP target, ``message`` encodes to more than
                ``max_datagram`` bytes.

        After retries, the error of the last attempt is raised, with the
        earlier attempts' errors attached as notes.
        """
        if isinstance(target, Target) and target.max_datagram is not None:
            return self._udp_request(target, message, timeouts, retries, idempotent)
        # No session function: _session sends `message` and receives the reply
        # itself. A plain method returning _session's coroutine, not an async
        # def awaiting it: one coroutine (and one frame to pass through at
        # every suspension) less per request.
        if retries is not None:
            as_policy(retries)  # a bad value fails now, not at the first failure
        coro: Coroutine[Any, Any, In] = self._session(
            target, key, timeouts, None, message, retries, idempotent
        )
        return coro

    async def run(
        self,
        target: Target[In, Out] | Upstream[Target[In, Out]],
        session_fn: Callable[[Connection[In, Out], Unpack[PosArgs]], Awaitable[R]],
        *args: Unpack[PosArgs],
        timeouts: Timeouts | None = None,
        key: object = None,
        retries: int | RetryPolicy | None = None,
        idempotent: bool = False,
    ) -> R:
        """One session of your own: ``await session_fn(conn, *args)`` on a pooled connection.

        Use it for exchanges that are not one message each way (a pipelined
        batch, a multi-part reply). The connection goes back to the pool only
        if ``session_fn`` returns and left nothing unread; if it raises, the
        connection is closed and the exception reaches you unchanged. The
        retry rules of :meth:`request` apply (``retries=``, ``idempotent=``):
        ``session_fn`` is called again, on another connection, after a
        failure the policy retries, as long as nothing was received in the
        failed attempt.
        """
        if retries is not None:
            as_policy(retries)
        return await self._session(
            target, key, timeouts, lambda conn: session_fn(conn, *args), None, retries, idempotent
        )

    def connection(
        self,
        target: Target[In, Out] | Upstream[Target[In, Out]],
        *,
        timeouts: Timeouts | None = None,
        key: object = None,
        retries: int | RetryPolicy | None = None,
        idempotent: bool = False,
        idle: Mapping[Idle, float] | None = None,
        on_idle: Callable[[Connection[In, Out], Idle], Awaitable[object]] | None = None,
    ) -> AbstractAsyncContextManager[Connection[In, Out]]:
        """Borrow a connection for the duration of an ``async with`` block.

        ``async with client.connection(target) as conn:`` gives you the
        :class:`Connection` for a longer session (a subscription, a
        conversation). Leaving the block normally with nothing unread returns
        it to the pool; leaving by an exception closes it. The block's body
        cannot be replayed, so only getting the connection is retried: a
        failed connect, when the policy (``retries=``) names ``"connect"`` or
        an :class:`Upstream` has another address. A stale pooled connection
        shows as an error in the body (:class:`ConnectionLost`,
        :class:`trio.EndOfChannel`). ``idempotent`` is accepted for symmetry
        with :meth:`request` and changes nothing here.

        ``idle`` and ``on_idle`` give the borrowed connection the idle
        detection of a service: ``idle={Idle.READ: 30.0}`` calls ``await
        on_idle(conn, Idle.READ)`` in the client's nursery once the connection
        has received nothing for 30 s, and again every 30 s while that lasts,
        until the block exits (e.g. to send heartbeats on a long
        subscription). One callback runs at a time; a slow one skips beats
        rather than piling them up. If it raises, the error is logged and the
        connection closed (the block sees it closed). A callback still
        running when the block exits is cancelled, and the connection is
        then closed rather than pooled.
        """
        if retries is not None:
            as_policy(retries)
        periods = check_idle_options(idle, on_idle)
        return self._borrow(target, key, timeouts, retries, periods, on_idle)

    def stats(self, target: Target[Any, Any]) -> PoolStats:
        """A :class:`PoolStats` snapshot of ``target``'s pool.

        For a name with several addresses, the sum over its per-address
        pools (:meth:`address_stats`), plus ``waiting``, ``failed`` and
        ``retries`` of the target as a whole. Zeros if the target was never
        used, or if its pool was dropped: a client that has used more than
        1,024 targets forgets the pools (and counters) of those it has no
        connection to.
        """
        if target.max_datagram is not None:
            return PoolStats() if self._udp is None else self._udp.stats(target)
        pool = self._pools.get(target)
        return PoolStats() if pool is None else pool.stats()

    def address_stats(self, target: Target[Any, Any]) -> dict[tuple[str, int], PoolStats]:
        """A :class:`PoolStats` per address of ``target``: ``{(ip, port): stats}``.

        The addresses of the current answer, and those dropped from it that
        still have connections; for an SRV target the keys are the records'
        ``(host, port)``. A numeric host has its one address; a Unix or UDP
        target, or one never used, gives ``{}``. ``open``, ``idle``,
        ``in_use``, ``created``, ``reused``, ``closed`` and
        ``health_checks_failed`` add up to :meth:`stats`'s (but for the
        counts of addresses no longer listed); ``connecting`` counts the
        connects to the address under way (one still waiting for the
        resolver has no address yet); ``failed`` counts the failed connects
        to the address and the failed sessions on its connections;
        ``waiting`` and ``retries`` are the target's and 0 here.
        """
        pool = self._pools.get(target)
        if pool is None or target.path is not None:
            return {}
        named = self._named.get(target)
        if named is None:
            assert target.host is not None
            return {(target.host, target.port): pool.stats()}
        stats = pool.address_stats(dict(named.connecting()))
        for address in named.addresses:
            stats.setdefault(address, PoolStats())
        return stats

    # -- the seam for Upstream ----------------------------------------------
    #
    # A session attempt goes through exactly two points that know what the
    # caller passed as the destination:
    #   _resolve(dest, key, tried) -> the Target for this attempt, and the
    #       UpstreamAttempt it is counted as (None for a plain Target);
    #   _report(attempt, ok) -> settles that attempt once it ended (True:
    #       success, False: a failure of that address, None: neither, e.g.
    #       cancelled, the caller's own error, a message the codec refused).
    # _can_resolve(dest, tried) says whether another attempt would find an
    # address (tried=None: any address; a list: one not tried yet), so a
    # retry never replaces the real error with an UpstreamUnavailable. An
    # Upstream plugs in here and nowhere else.

    def _resolve(
        self, dest: _Dest, key: object, tried: list[Target[Any, Any]]
    ) -> tuple[Target[Any, Any], UpstreamAttempt[Target[Any, Any]] | None]:
        if isinstance(dest, Upstream):
            # A retry goes to an address not tried yet where one is
            # available, else to one tried already.
            exclude = tried if not tried or dest.can_choose(tried) else ()
            attempt = dest.choose(key, exclude)
            return attempt.target, attempt
        return dest, None

    def _report(self, attempt: UpstreamAttempt[Target[Any, Any]] | None, ok: bool | None) -> None:
        if attempt is not None:
            attempt.settle(ok)

    def _can_resolve(self, dest: _Dest, tried: list[Target[Any, Any]] | None) -> bool:
        return not isinstance(dest, Upstream) or dest.can_choose(tried or ())

    # -- internals -----------------------------------------------------------

    def _effective_timeouts(self, target: Target[Any, Any], call: Timeouts | None) -> Timeouts:
        # Whole-value precedence: call > target > client > defaults.
        if call is not None:
            return call
        if target.timeouts is not None:
            return target.timeouts
        if self._timeouts is not None:
            return self._timeouts
        return _DEFAULT_TIMEOUTS

    def _pool(
        self, target: Target[Any, Any], attempt: UpstreamAttempt[Target[Any, Any]] | None
    ) -> KeepAlivePool:
        """``target``'s pool, made on first use; settles ``attempt`` if it raises."""
        pool = self._pools.get(target)
        if pool is None:
            if self._closed:
                self._report(attempt, None)
                raise trio.ClosedResourceError("the client is closed")
            if target.max_datagram is not None:
                self._report(attempt, None)
                raise TypeError(
                    f"{target} is a UDP target: only client.request() works with it, "
                    "and an Upstream cannot hold it"
                )
            if len(self._pools) >= self._sweep_at:
                self._drop_unused_pools()
            named = self._addresses_of(target, attempt)
            pool = self._pools[target] = KeepAlivePool(
                target.address,
                target.max_connections,
                check_after=None if target.health_check is None else target.health_check_after,
                max_lifetime=target.max_lifetime,
                min_idle=target.min_idle,
            )
            if named is not None:
                self._named[target] = named
            if target.min_idle:
                self._nursery.start_soon(self._keep_min_idle, target, pool)
        return pool

    def _addresses_of(
        self, target: Target[Any, Any], attempt: UpstreamAttempt[Target[Any, Any]] | None
    ) -> TargetAddresses | None:
        """A new :class:`TargetAddresses` for a target with a name, else None."""
        if target.path is not None or target.host is None:
            return None
        if target.srv_lookup:
            if not isinstance(self._resolver, SrvResolver):
                self._report(attempt, None)
                raise TypeError(
                    f"{target} is an SRV target, but the client's resolver "
                    f"{self._resolver!r} has no resolve_srv(): pass "
                    "open_client(resolver=triocomm.DnsResolver([...])) or one of your own"
                )
        elif is_numeric_host(target.host):
            return None  # a numeric host is its one address: no lookup, no fuse
        return TargetAddresses(
            target.address,
            target.host,
            target.port,
            srv=target.srv_lookup,
            max_fails=target.max_fails,
            fuse_time=target.fuse_time,
        )

    def _drop_unused_pools(self) -> None:
        """Forget the pools of targets with no connection, open or coming, and no waiter.

        Run when a new target would take the client past the pools it keeps,
        so a client meeting ever new targets (a crawler, a proxy) does not
        grow without bound. Their counters go with them. The next sweep
        waits until the pools left have doubled, so sweeping costs O(1) per
        new target even when every pool is busy.
        """
        kept = {}
        for target, pool in self._pools.items():
            if pool.unused:
                stats = pool.stats()
                self._attempts_elsewhere += stats.created + stats.reused
            else:
                kept[target] = pool
        self._pools = kept
        self._named = {t: a for t, a in self._named.items() if t in kept}
        # The identity cache must never lend from a pool that is not here:
        # _shutdown closes only the pools in _pools.
        self._last_route = None
        self._sweep_at = max(_POOLS_KEPT, 2 * len(self._pools))

    async def _checkout(
        self,
        target: Target[Any, Any],
        pool: KeepAlivePool,
        timeouts: Timeouts,
        fresh: bool,
        avoid: list[Address] | None = None,
    ) -> tuple[PooledConnection, bool]:
        """Borrow a connection: ``(entry, reused)``. Opens one if the pool has none.

        A pooled connection due for its health check is checked first; one
        that fails it is closed and the next is taken (or one is opened).
        ``avoid``: the addresses this session tried already (a new connection
        goes elsewhere if it can); those that fail now are added.
        """
        observers = self._observers
        while True:
            if observers is None:
                entry = await pool.acquire(timeouts.pool, fresh=fresh)
            else:
                entry = await self._observed_acquire(observers, target, pool, timeouts, fresh)
            if entry is None:
                break
            if not entry.check_due or await self._health_check(target, pool, entry, timeouts):
                return entry, True
        entry = await self._open_new(target, pool, timeouts, avoid)
        pool.connected(entry)
        return entry, False

    async def _open_new(
        self,
        target: Target[Any, Any],
        pool: KeepAlivePool,
        timeouts: Timeouts,
        avoid: list[Address] | None = None,
    ) -> PooledConnection:
        """Open a connection in the ``CONNECTING`` slot the caller holds, and run ``on_connect``.

        Returns its entry, still ``CONNECTING``; on failure the slot is given
        back and the error raised.
        """
        # The connection's own task opens it.
        started: list[PooledConnection] = []
        try:
            result = await self._nursery.start(
                pool.connection_task
                if self._observers is None
                else functools.partial(self._observed_connection_task, pool),
                lambda: self._open(target, timeouts, pool, avoid),
                started,
            )
        except BaseException:
            if started:
                pool.abandon_new(started[0])
            else:
                pool.cancel_connecting()
            raise
        if isinstance(result, BaseException):
            pool.cancel_connecting()
            raise result
        entry: PooledConnection = result
        if target.on_connect is not None:
            conn = entry.conn
            _start_session(conn, timeouts)  # on_connect is the session with seq == 0
            try:
                await target.on_connect(conn)
                if not conn.between_messages:
                    raise ConnectionLost(
                        f"on_connect left unread data on the connection to {target}; "
                        "it cannot be reused safely"
                    )
            except BaseException as exc:
                self._closes_because(conn, exc)
                pool.abandon_new(entry)
                await conn.abort()
                raise
        return entry

    async def _keep_min_idle(self, target: Target[Any, Any], pool: KeepAlivePool) -> None:
        """Open connections in the background while the pool has fewer than ``min_idle`` idle.

        A task of the client's nursery, started with the pool: it ends with
        the client. A failed connect is tried again after a pause that
        doubles from 0.5 s up to 30 s, so a dead peer is not hammered.
        """
        pause = 0.0
        while True:
            try:
                await pool.take_spare_slot()
            except trio.ClosedResourceError:
                return  # the client is closing
            timeouts = self._effective_timeouts(target, None)
            try:
                entry = await self._open_new(target, pool, timeouts)
            except Exception as exc:
                pool.spare_failed()
                pause = min(_SPARE_PAUSE_MAX, max(_SPARE_PAUSE_MIN, pause * 2))
                logger.debug(
                    "background connect to %s failed (%s); next in %gs", target, exc, pause
                )
                await trio.sleep(pause)
                continue
            except BaseException:
                pool.spare_failed()
                raise
            pause = 0.0
            pool.spare_ready(entry, keepalive=timeouts.keepalive)

    async def _health_check(
        self,
        target: Target[Any, Any],
        pool: KeepAlivePool,
        entry: PooledConnection,
        timeouts: Timeouts,
    ) -> bool:
        """Run ``target.health_check`` on a pooled connection; True if it passed."""
        conn = entry.conn
        check = target.health_check
        assert check is not None  # check_due is only set for targets with one
        _start_session(conn, timeouts)  # the check's reads and writes get the limits
        try:
            await check(conn)
        except Exception as exc:
            logger.debug("health check of %s failed: %r", conn.peer, exc)
            self._closes_because(conn, exc)
            ok = False
        except BaseException as exc:
            self._closes_because(conn, exc)
            pool.check_done(entry, None)  # bookkeeping first: the close may be cancelled
            await conn.abort()
            raise
        else:
            ok = not entry.left_unread() and not entry.peer_spoke()
            if not ok:
                logger.debug("health check of %s left unread data", conn.peer)
                self._closes_because(
                    conn, ConnectionLost(f"the health check left unread data on {conn.peer}")
                )
        pool.check_done(entry, ok)
        if not ok:
            await conn.abort()
        return ok

    async def _observed_acquire(
        self,
        observers: ObserverSet,
        target: Target[Any, Any],
        pool: KeepAlivePool,
        timeouts: Timeouts,
        fresh: bool,
    ) -> PooledConnection | None:
        """``pool.acquire``, telling ``observers`` how long a session queued for a slot."""
        stats = pool.stats()
        queued = stats.waiting > 0 or stats.open + stats.connecting >= pool.max_connections
        started = trio.current_time()
        try:
            return await pool.acquire(timeouts.pool, fresh=fresh)
        finally:
            if queued:
                observers.pool_wait(target, trio.current_time() - started)

    async def _observed_connection_task(
        self,
        pool: KeepAlivePool,
        open_connection: Callable[[], Awaitable[tuple[Connection[Any, Any], Address | None]]],
        started: list[PooledConnection],
        *,
        task_status: trio.TaskStatus[PooledConnection | Exception] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The pool's connection task, telling the observers when its connection closed."""
        try:
            await pool.connection_task(open_connection, started, task_status=task_status)
        finally:
            if started and self._observers is not None:
                conn = started[0].conn
                self._observers.connection_closed(conn, self._failures.pop(conn.id, None))

    async def _open(
        self,
        target: Target[Any, Any],
        timeouts: Timeouts,
        pool: KeepAlivePool,
        avoid: list[Address] | None,
    ) -> tuple[Connection[Any, Any], Address | None]:
        """A new connection, and the address it went to (None: the target's only one)."""
        if self._observers is None:
            return await self._connect(target, timeouts, pool, avoid)
        try:
            conn, address = await self._connect(target, timeouts, pool, avoid)
        except Exception as exc:
            # A named target's connects are told per address (_connect_named).
            if target.path is not None or target not in self._named:
                where = target.path if target.path is not None else (target.host, target.port)
                self._observers.connect_failed(where, exc)  # type: ignore[arg-type]
            raise
        self._observers.connection_opened(conn)
        return conn, address

    async def _connect(
        self,
        target: Target[Any, Any],
        timeouts: Timeouts,
        pool: KeepAlivePool,
        avoid: list[Address] | None,
    ) -> tuple[Connection[Any, Any], Address | None]:
        limit = timeouts.connect
        deadline = _INF if limit is None else trio.current_time() + limit
        with PhaseLimit(deadline, "connect", limit, target.address):
            named = self._named.get(target) if target.path is None else None
            address = None
            if named is None:
                stream = await _open_stream(target)
            else:
                stream, address = await self._connect_named(target, named, pool, avoid)
            conn: Connection[Any, Any] = Connection(stream, target.codec)
            label = None
            if target.host is not None and not is_numeric_host(target.host):
                # Name the target as the user wrote it, next to the address.
                label = f"{target.address} ({conn.peer})"
            conn._attach(self._timers, label=label)
            logger.debug("connected to %s", conn.peer)
            return conn, address
        raise AssertionError("unreachable: the scope raised its timeout")  # pragma: no cover

    async def _connect_named(
        self,
        target: Target[Any, Any],
        named: TargetAddresses,
        pool: KeepAlivePool,
        avoid: list[Address] | None,
    ) -> tuple[trio.abc.Stream, Address]:
        """Connect to the best address of a named target, trying the others in turn.

        Looks the name up first if its answer has expired. Each failed
        connect counts toward that address's fuse, and is told to the
        observers with that address (a failed lookup with the target's).
        """
        observers = self._observers
        if named.expired():
            try:
                refreshed = await named.refresh(self._resolver)
            except ConnectError as exc:
                if observers is not None:
                    observers.connect_failed((named.host, named.port), exc)
                raise
            if refreshed:
                pool.keep_addresses(named.addresses)
        errors: list[ConnectError] = []
        for address in named.candidates(pool.address_load(), avoid or ()):
            attempt = named.begin(address)
            if attempt is None:
                continue  # fused meanwhile (another task took its trial)
            try:
                stream = await self._connect_address(target, address)
            except ConnectError as exc:
                attempt.settle(False)
                pool.record_connect_failure(address)
                if observers is not None:
                    observers.connect_failed(address, exc)
                if avoid is not None:
                    avoid.append(address)
                errors.append(exc)
                continue
            except BaseException:
                attempt.settle(None)
                raise
            attempt.settle(True)
            return stream, address
        where = target.address
        if not errors:
            raise ConnectError(
                f"cannot connect to {where}: every address is fused "
                f"({named.fused()} of {len(named.addresses)}; fuse_time={target.fuse_time:g}s)",
                address=where,
            )
        reasons = "; ".join(str(error) for error in errors)
        # Chained to the last address's own cause (the OSError, the SSLError).
        cause = errors[-1].__cause__ or errors[-1]
        raise ConnectError(f"cannot connect to {where}: {reasons}", address=where) from cause

    async def _connect_address(self, target: Target[Any, Any], address: Address) -> trio.abc.Stream:
        """Connect to one address of a named target (an SRV record's host is resolved)."""
        host, port = address
        if not target.srv_lookup or is_numeric_host(host):
            return await _open_stream(target, host, port, record_host=host)
        where = _address_text(host, port)
        try:
            answer = await resolve_with_expiry(self._resolver, host, port)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {where}: {exc}", address=where) from exc
        error = ConnectError(f"cannot resolve {where}: no address", address=where)
        for ip, ip_port in answer.records:
            try:
                return await _open_stream(target, ip, ip_port, record_host=host)
            except ConnectError as exc:
                error = exc
        raise error

    async def _session(
        self,
        dest: _Dest,
        key: object,
        call_timeouts: Timeouts | None,
        body: Callable[[Connection[Any, Any]], Awaitable[R]] | None,
        message: object = None,
        retries: int | RetryPolicy | None = None,
        idempotent: bool = False,
    ) -> R:
        """One session attempt after another until one succeeds or may not be retried.

        ``body`` is the session (``client.run``); ``None`` means
        ``client.request``: send ``message``, receive one reply. That case is
        written out here rather than passed as a function, so that each of its
        suspensions passes through one coroutine frame less.
        """
        request = body is None
        tried: list[Target[Any, Any]] = []
        attempts: SessionAttempts | None = None  # made when an attempt first fails
        fresh = False
        avoid: list[Address] | None = None  # addresses tried (made on first need)
        while True:
            target, attempt = self._resolve(dest, key, tried)
            tried.append(target)
            data = None
            if request:
                # Before borrowing: a message the codec refuses touches no connection.
                try:
                    data = target.codec.encode(message)
                except BaseException:
                    self._report(attempt, None)
                    raise
            route = self._last_route
            if route is None or route[0] is not target:
                route = self._route(target, attempt)
            _, pool, timeouts, limits = route
            if call_timeouts is not None:
                timeouts, limits = call_timeouts, session_limits(call_timeouts)
            # The usual case first: a sound idle connection, lent without a
            # coroutine call (_checkout would find the pool in the same state).
            entry = None if fresh else pool.lend_idle()
            reused = True
            if entry is None:
                avoid = avoid or []
                try:
                    entry, reused = await self._checkout(target, pool, timeouts, fresh, avoid)
                except BaseException as exc:
                    kind = self._connect_failed(exc, pool, attempt)
                    attempts = attempts or self._attempts(retries, idempotent)
                    if await self._retry(
                        attempts, exc, kind, target, pool.record_retry, dest, tried
                    ):
                        continue
                    raise
            conn = entry.conn
            received_before = entry.stats.bytes_received
            conn._begin_session(limits)
            result: R
            try:
                work = conn._exchange(data) if body is None else body(conn)
                result = await (work if self._observers is None else self._observed(conn, work))
            except BaseException as exc:
                error, kind = await self._attempt_failed(
                    exc, entry, pool, attempt, request, reused, received_before
                )
                avoid = _tried_address(avoid, entry)
                attempts = attempts or self._attempts(retries, idempotent)
                if await self._retry(attempts, error, kind, target, pool.record_retry, dest, tried):
                    # After a reused connection failed, its pool mates may be
                    # stale too: the next attempt opens a fresh one.
                    fresh = reused
                    continue
                if error is exc:
                    raise
                raise error from exc
            self._finish(entry, pool, timeouts)
            if attempt is not None:
                attempt.settle(True)
            return result

    def _route(
        self, target: Target[Any, Any], attempt: UpstreamAttempt[Target[Any, Any]] | None
    ) -> _Route:
        """``target``'s pool and its sessions' own timeouts, kept for the next session."""
        timeouts = self._effective_timeouts(target, None)
        route = (target, self._pool(target, attempt), timeouts, session_limits(timeouts))
        self._last_route = route
        return route

    async def _attempt_failed(
        self,
        exc: BaseException,
        entry: PooledConnection,
        pool: KeepAlivePool,
        attempt: UpstreamAttempt[Target[Any, Any]] | None,
        request: bool,
        reused: bool,
        received_before: int,
    ) -> tuple[BaseException, RetryKind | None]:
        """A session attempt raised ``exc``: close its connection, count the failure.

        Returns the error to raise (``exc``, or the ``ConnectionLost`` a
        request's early end of stream becomes) and the failure's retry kind.
        """
        # Bookkeeping first: the close below may be cancelled.
        pool.release(entry, reusable=False)
        pool.record_failure(entry)
        conn = entry.conn
        await conn.abort()
        self._report(attempt, _address_failed(exc))
        error = exc
        if request and isinstance(exc, trio.EndOfChannel):
            error = ConnectionLost(f"{conn.peer} closed the connection before replying")
        replied = entry.stats.bytes_received != received_before
        return error, session_failure_kind(exc, reused=reused, replied=replied)

    async def _observed(self, conn: Connection[Any, Any], work: Awaitable[R]) -> R:
        """``await work``, one session on ``conn``, reported to the observers."""
        observers = self._observers
        assert observers is not None
        began = observers.session_started(conn)
        try:
            result = await work
        except BaseException as exc:
            self._session_failed(observers, conn, exc, began)
            raise
        observers.session_ended(conn, None, began)
        return result

    def _closes_because(self, conn: Connection[Any, Any], exc: BaseException) -> None:
        """``conn`` is about to be closed by ``exc``: keep it for ``connection_closed``
        (only with observers, which take it back when the connection's task ends)."""
        if self._observers is not None:
            self._failures[conn.id] = exc

    def _session_failed(
        self, observers: ObserverSet, conn: Connection[Any, Any], exc: BaseException, began: float
    ) -> None:
        """A session failed and closes its connection: tell the observers, keep why."""
        self._failures[conn.id] = exc
        observers.session_ended(conn, exc, began)

    def _attempts(self, retries: int | RetryPolicy | None, idempotent: bool) -> SessionAttempts:
        """The retry state of a session whose first attempt just failed."""
        policy = self._retries if retries is None else as_policy(retries)
        return SessionAttempts(policy, idempotent)

    async def _retry(
        self,
        attempts: SessionAttempts,
        error: BaseException,
        kind: RetryKind | None,
        target: Target[Any, Any],
        count_retry: Callable[[], object],
        dest: _Dest,
        tried: list[Target[Any, Any]],
    ) -> bool:
        """An attempt failed with ``error``: True if the session tries again.

        The one place where a retry is decided and begun, for every session
        method. It waits out the backoff. When it returns False the caller
        raises ``error``, which carries the earlier attempts' errors as notes.
        """
        elsewhere = isinstance(dest, Upstream) and self._can_resolve(dest, tried)
        if not attempts.allows(kind, elsewhere=elsewhere) or not self._can_resolve(dest, None):
            attempts.annotate(error)
            return False
        budget = attempts.policy.budget
        if budget is not None and not self._budget_window().allows(budget):
            attempts.annotate(error, f"not retried: the retry budget ({budget:g}) is spent")
            return False
        # A cancelled session is never retried: this raises Cancelled instead.
        await trio.lowlevel.checkpoint_if_cancelled()
        attempts.failed(error, kind, target)
        # Counted against the budget at once, so that sessions failing
        # together cannot all pass the check during their backoff.
        self._budget_window().retried()
        delay = attempts.next()
        if delay > 0:
            await trio.sleep(delay)  # cancelling it ends the session: no retry
        if not self._can_resolve(dest, None):
            # Every address was fused while we waited: the real error, not
            # UpstreamUnavailable, reaches the caller.
            attempts.annotate(error)
            return False
        count_retry()  # PoolStats.retries of the target that failed
        if self._observers is not None:
            self._observers.retry(target, attempts.number, error)
        logger.debug("retrying with attempt %d after %s failed: %r", attempts.number, target, error)
        return True

    def _budget_window(self) -> RetryWindow:
        window = self._retry_window
        if window is None:
            window = self._retry_window = RetryWindow(self._attempts_total, self._timers)
        return window

    def _attempts_total(self) -> int:
        """Session attempts since the client opened (for the retry budget)."""
        counted = self._attempts_elsewhere
        for pool in self._pools.values():
            stats = pool.stats()
            counted += stats.created + stats.reused
        return counted

    def _connect_failed(
        self,
        exc: BaseException,
        pool: KeepAlivePool,
        attempt: UpstreamAttempt[Target[Any, Any]] | None,
    ) -> RetryKind | None:
        """Count a failed borrow; returns its kind (``"connect"`` or None)."""
        pool.record_failure()
        self._attempts_elsewhere += 1
        kind = connect_failure_kind(exc)
        self._report(attempt, False if kind is not None else None)
        return kind

    def _finish(
        self,
        entry: PooledConnection,
        pool: KeepAlivePool,
        timeouts: Timeouts,
        interrupted: bool = False,
    ) -> None:
        """A session ended well: pool its connection unless something is left unread.

        ``interrupted``: something else was using the connection when the
        session ended (an ``on_idle`` callback), so it is closed instead.
        """
        conn = entry.conn
        reusable = not interrupted and not entry.left_unread()
        if not reusable:
            logger.debug("unrequested data or I/O left on %s after a session; closing", conn.peer)
        pool.release(entry, reusable=reusable, keepalive=timeouts.keepalive)

    @asynccontextmanager
    async def _borrow(
        self,
        dest: _Dest,
        key: object,
        call_timeouts: Timeouts | None,
        retries: int | RetryPolicy | None,
        idle: Mapping[Idle, float],
        on_idle: Callable[[Connection[Any, Any], Idle], Awaitable[object]] | None,
    ) -> AsyncIterator[Connection[Any, Any]]:
        tried: list[Target[Any, Any]] = []
        attempts: SessionAttempts | None = None
        avoid: list[Address] = []
        while True:
            target, attempt = self._resolve(dest, key, tried)
            tried.append(target)
            timeouts = self._effective_timeouts(target, call_timeouts)
            pool = self._pool(target, attempt)
            try:
                entry, _ = await self._checkout(target, pool, timeouts, False, avoid)
                break
            except BaseException as exc:
                kind = self._connect_failed(exc, pool, attempt)
                # The block cannot be replayed: only getting a connection is
                # retried, and "connect" needs no idempotent call.
                attempts = attempts or self._attempts(retries, False)
                if not await self._retry(
                    attempts, exc, kind, target, pool.record_retry, dest, tried
                ):
                    raise
        conn = entry.conn
        _start_session(conn, timeouts)
        observers = self._observers
        began = 0.0 if observers is None else observers.session_started(conn)
        watch = None
        if on_idle is not None:
            watch = IdleWatch(conn, idle, on_idle, self._nursery.start_soon, self._timers)
        try:
            yield conn
        except BaseException as exc:
            if watch is not None:
                watch.stop()
            pool.release(entry, reusable=False)
            pool.record_failure(entry)
            if observers is not None:
                self._session_failed(observers, conn, exc, began)
            await conn.abort()
            self._report(attempt, _address_failed(exc))
            raise
        # A callback cancelled now may have been part-way through a send.
        interrupted = watch is not None and watch.stop()
        self._finish(entry, pool, timeouts, interrupted)
        self._report(attempt, True)
        if observers is not None:
            observers.session_ended(conn, None, began)

    async def _udp_request(
        self,
        target: Target[Any, Any],
        message: object,
        call_timeouts: Timeouts | None,
        retries: int | RetryPolicy | None,
        idempotent: bool,
    ) -> Any:
        """UDP exchanges until one succeeds or the policy stops: a lost datagram
        (``CommTimeout``, ``"first_response"``) is a ``"timeout"``, resent when the
        policy names it and the call is idempotent."""
        if self._udp is None:
            if self._closed:
                raise trio.ClosedResourceError("the client is closed")
            self._udp = UdpExchanges(self._resolver)
        udp = self._udp
        timeouts = self._effective_timeouts(target, call_timeouts)
        attempts: SessionAttempts | None = None
        while True:
            self._attempts_elsewhere += 1  # counted for the retry budget
            try:
                return await udp.request(target, message, timeouts)
            except BaseException as exc:
                kind = connect_failure_kind(exc)
                if isinstance(exc, CommTimeout):
                    kind = session_failure_kind(exc, reused=False, replied=False)
                attempts = attempts or self._attempts(retries, idempotent)
                count = functools.partial(udp.record_retry, target)
                if not await self._retry(attempts, exc, kind, target, count, target, [target]):
                    raise

    def _shutdown(self) -> None:
        self._closed = True
        if self._udp is not None:
            self._udp.close()
        for pool in self._pools.values():
            pool.close()
        # Ends every connection task; each closes its own socket.
        self._nursery.cancel_scope.cancel()


class _ClientContext(AbstractAsyncContextManager[Client]):
    """What :func:`open_client` returns: enters a nursery, yields a :class:`Client`."""

    def __init__(
        self,
        timeouts: Timeouts | None,
        retries: RetryPolicy,
        observers: ObserverSet | None,
        resolver: Resolver | None,
    ) -> None:
        self._timeouts = timeouts
        self._retries = retries
        self._observers = observers
        self._resolver = resolver
        # The default resolver, made, entered and left by the client itself.
        self._own_resolver: CachingResolver | None = None
        self._nursery_manager: Any = None
        self._client: Client | None = None

    async def __aenter__(self) -> Client:
        if self._nursery_manager is not None:
            raise RuntimeError("an open_client() context can be entered only once")
        self._nursery_manager = trio.open_nursery()
        resolver = self._resolver
        if resolver is None:
            resolver = self._own_resolver = CachingResolver(ttl=60.0)
            # Neither enter checkpoints: a cancel cannot fall between them.
            await self._own_resolver.__aenter__()
        nursery = await self._nursery_manager.__aenter__()
        self._client = Client(
            nursery, self._timeouts, self._retries, self._observers, resolver=resolver
        )
        if self._observers is not None:
            self._observers.attached(self._client)
        # start_soon, not start: no checkpoint between entering the nursery
        # and returning (a cancel there would leave the nursery entered).
        # Reads that wait before it runs use a cancel scope instead.
        nursery.start_soon(self._client._timers.run)
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        assert self._client is not None
        self._client._shutdown()
        # The body's exception is not handed to the nursery: it would come out
        # wrapped in an ExceptionGroup. The connection tasks never raise, so
        # the nursery ends cleanly and the exception propagates as itself.
        try:
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            if self._observers is not None:
                self._observers.detached(self._client)
            if self._own_resolver is not None:
                await self._own_resolver.__aexit__(None, None, None)
        return False


def open_client(
    *,
    timeouts: Timeouts | None = None,
    retries: int | RetryPolicy = 1,
    observers: Iterable[Observer] | None = None,
    resolver: Resolver | None = None,
) -> AbstractAsyncContextManager[Client]:
    """Open a :class:`Client`: ``async with triocomm.open_client() as client: ...``.

    Args:
        timeouts: the client-wide :class:`Timeouts`, used for targets that
            have none of their own (defaults: ``Timeouts()``).
        retries: the client's :class:`RetryPolicy`, which a call's own
            ``retries=`` replaces. An int ``n`` means
            ``RetryPolicy(attempts=n + 1, on=("stale",))``: a session is sent
            again, up to ``n`` times, on a fresh connection when a *reused*
            connection was found closed or reset before any reply byte
            arrived (0 disables); a failed connect is then not retried to
            the same target.
        observers: :class:`Observer` objects told of this client's
            connections, sessions, pool waits and retries.
        resolver: what turns the host names of targets into addresses (a
            :class:`Resolver`; :meth:`Target.srv` needs one with
            ``resolve_srv``, such as :class:`DnsResolver`). ``None``: a
            :class:`CachingResolver` with ``ttl=60.0``, made for this client
            and entered and left with it. A resolver you pass is yours to
            enter (``async with resolver, open_client(resolver=resolver)``),
            so that several clients can share one and its cache; using one
            that is not running raises ``RuntimeError``. A numeric host
            never reaches the resolver.

    Every connection is a task in the client's nursery. Leaving the block
    closes every connection and waits for every task: no task, socket or file
    descriptor outlives it.
    """
    if timeouts is not None and not isinstance(timeouts, Timeouts):
        raise TypeError(f"timeouts must be a Timeouts, got {timeouts!r}")
    if resolver is not None and not isinstance(resolver, Resolver):
        raise TypeError(f"resolver must have an async resolve(host, port), got {resolver!r}")
    return _ClientContext(timeouts, as_policy(retries), ObserverSet.of(observers), resolver)
