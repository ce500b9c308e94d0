"""The client's UDP exchange: one request datagram, the first reply datagram.

``client.request`` on a target made by ``Target.udp`` comes here instead of
the keep-alive pool. Each exchange runs on a connected UDP socket of its own,
so the kernel delivers to it only what the target's address sends. A socket
goes back to a small per-target cache only after an exchange that succeeded;
before it is used again, any datagram waiting on it (a duplicate, a reply
that came twice) is read and thrown away. A socket whose exchange timed out,
failed or was cancelled is closed: a late reply to it can never be taken for
the reply to a later request.

One call of :meth:`UdpExchanges.request` is one *attempt*: a lost datagram
shows as :class:`CommTimeout` with phase ``"first_response"``; resending is
the client's retry policy's decision, not this module's.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import trio

from ._connection import PhaseLimit
from ._datagram import check_max_datagram, decode_datagram, encode_datagram
from ._errors import ConnectError, ProtocolError
from ._pool import PoolStats
from ._resolve import Resolver, is_numeric_host, resolve_with_expiry
from ._timeouts import Timeouts

if TYPE_CHECKING:
    from ._client import Target

__all__ = ["FIRST_RESPONSE", "UdpExchanges", "check_udp_target"]

#: How long a UDP exchange waits for its reply when ``Timeouts.first_response``
#: is ``None``: a datagram may be lost, and nothing else would end the wait.
FIRST_RESPONSE = 1.0
# Sockets kept per target after exchanges that succeeded (LIFO).
_CACHED = 8
# Stray datagrams read off a cached socket before reuse; a socket holding more
# than this is closed instead (someone is flooding it).
_DRAIN_LIMIT = 16
# Per-target records kept before those with no socket and no waiter are dropped.
_TARGETS_KEPT = 1024
_INF = float("inf")


def check_udp_target(
    path: object, ssl_context: object, on_connect: object, max_datagram: object
) -> None:
    """The checks a UDP :class:`Target` adds to a stream target's."""
    check_max_datagram(max_datagram)
    if path is not None:
        raise TypeError("a UDP target takes a host and port, not a path")
    if ssl_context not in (None, False):
        raise TypeError("a UDP target cannot speak TLS (ssl_context=)")
    if on_connect is not None:
        raise TypeError("a UDP target has no connection for on_connect= to run on")


class _TargetSockets:
    """The sockets of one UDP target: the cache of idle ones, the slots, the counters."""

    __slots__ = (
        "closed",
        "created",
        "failed",
        "idle",
        "in_use",
        "retries",
        "reused",
        "slots",
        "waiting",
    )

    def __init__(self, max_connections: int) -> None:
        self.idle: list[socket.socket] = []
        self.slots = trio.Semaphore(max_connections)
        self.in_use = 0
        self.waiting = 0
        self.created = 0
        self.reused = 0
        self.closed = 0
        self.failed = 0
        self.retries = 0

    def stats(self) -> PoolStats:
        idle = len(self.idle)
        return PoolStats(
            open=idle + self.in_use,
            idle=idle,
            in_use=self.in_use,
            waiting=self.waiting,
            created=self.created,
            reused=self.reused,
            closed=self.closed,
            failed=self.failed,
            retries=self.retries,
        )

    @property
    def unused(self) -> bool:
        return not (self.idle or self.in_use or self.waiting)

    async def acquire(self, limit: float | None, address: str) -> None:
        """Take one of the target's ``max_connections`` slots (FIFO, up to ``limit``)."""
        try:
            self.slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        self.waiting += 1
        try:
            deadline = _INF if limit is None else trio.current_time() + limit
            with PhaseLimit(deadline, "pool", limit, address):
                await self.slots.acquire()
        finally:
            self.waiting -= 1

    def take_idle(self) -> socket.socket | None:
        """A cached socket with nothing waiting on it (LIFO), or ``None``."""
        while self.idle:
            sock = self.idle.pop()
            if _drained(sock):
                return sock
            self.close(sock)
        return None

    def give_back(self, sock: socket.socket, ok: bool) -> None:
        """An exchange on ``sock`` ended: cache the socket after a success, else close it."""
        self.in_use -= 1
        if ok and len(self.idle) < _CACHED:
            self.idle.append(sock)
        else:
            self.close(sock)

    def close(self, sock: socket.socket) -> None:
        sock.close()
        self.closed += 1

    def close_idle(self) -> None:
        while self.idle:
            self.close(self.idle.pop())


def _drained(sock: socket.socket) -> bool:
    """Throw away what waits on ``sock``; False if it held too much (or failed)."""
    for _ in range(_DRAIN_LIMIT):
        try:
            sock.recv(1)  # a datagram is consumed whole, whatever its size
        except BlockingIOError:
            return True
        except OSError:
            return False  # an ICMP error from an earlier send: start afresh
    return False


class UdpExchanges:
    """Every UDP target of one client: their sockets, and the exchange itself."""

    def __init__(self, resolver: Resolver) -> None:
        # The client's resolver: a host name becomes an address through it.
        self._resolver = resolver
        self._targets: dict[Target[Any, Any], _TargetSockets] = {}
        self._closed = False

    def stats(self, target: Target[Any, Any]) -> PoolStats:
        """``client.stats(target)`` for a UDP target: its sockets counted as connections."""
        record = self._targets.get(target)
        return PoolStats() if record is None else record.stats()

    def record_retry(self, target: Target[Any, Any]) -> None:
        """Count a failed exchange with ``target`` that the client tries again."""
        record = self._targets.get(target)
        if record is not None:
            record.retries += 1

    def close(self) -> None:
        """The client is closing: close the cached sockets; refuse new exchanges."""
        self._closed = True
        for record in self._targets.values():
            record.close_idle()

    def _record(self, target: Target[Any, Any]) -> _TargetSockets:
        if self._closed:
            raise trio.ClosedResourceError("the client is closed")
        record = self._targets.get(target)
        if record is None:
            if len(self._targets) >= _TARGETS_KEPT:
                self._targets = {t: r for t, r in self._targets.items() if not r.unused}
            record = self._targets[target] = _TargetSockets(target.max_connections)
        return record

    async def request(self, target: Target[Any, Any], message: object, timeouts: Timeouts) -> Any:
        """One exchange with ``target``: send ``message`` as a datagram, return the reply.

        Raises what ``client.request`` documents for a UDP target.
        """
        assert target.max_datagram is not None
        data = encode_datagram(target.codec, message, target.max_datagram)
        record = self._record(target)
        address = target.address
        try:
            await record.acquire(timeouts.pool, address)
        except BaseException:
            record.failed += 1
            raise
        try:
            sock = record.take_idle()
            if sock is None:
                sock = await _open(target, timeouts, self._resolver)
                record.created += 1
            else:
                record.reused += 1
            record.in_use += 1
            ok = False
            try:
                reply = await _exchange(sock, data, target, timeouts)
                ok = True
            finally:
                record.give_back(sock, ok and not self._closed)
            return reply
        except BaseException:
            record.failed += 1
            raise
        finally:
            record.slots.release()


async def _open(target: Target[Any, Any], timeouts: Timeouts, resolver: Resolver) -> socket.socket:
    """A non-blocking UDP socket connected to ``target`` (resolved under ``connect``).

    A host name goes through the client's resolver (its first address is
    used); the address is then turned into a socket address without a lookup.
    """
    address = target.address
    assert target.host is not None
    limit = timeouts.connect
    deadline = _INF if limit is None else trio.current_time() + limit
    with PhaseLimit(deadline, "connect", limit, address):
        try:
            ip, port = target.host, target.port
            if not is_numeric_host(ip):
                records = (await resolve_with_expiry(resolver, ip, port)).records
                if not records:
                    raise socket.gaierror(socket.EAI_NONAME, "the resolver gave no address")
                ip, port = records[0]
            infos = await trio.socket.getaddrinfo(
                ip, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST
            )
        except OSError as exc:
            raise ConnectError(f"cannot resolve {address}: {exc}", address=address) from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConnectError(f"cannot send to {address}: {exc}", address=address) from exc
    return sock


async def _exchange(
    sock: socket.socket, data: Any, target: Target[Any, Any], timeouts: Timeouts
) -> Any:
    """Send ``data``, wait for one datagram (``first_response``), decode it.

    A lost datagram (or reply) raises :class:`CommTimeout` with phase
    ``"first_response"``.
    """
    assert target.max_datagram is not None
    address = target.address
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        await _send(sock, data, timeouts.send, address)
        limit = timeouts.first_response
        if limit is None:
            limit = FIRST_RESPONSE
        waited = False
        with PhaseLimit(trio.current_time() + limit, "first_response", limit, address):
            while True:
                try:
                    reply = sock.recv(target.max_datagram + 1)
                    break
                except BlockingIOError:
                    waited = True
                    await trio.lowlevel.wait_readable(sock)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
    except ConnectionRefusedError as exc:
        # The kernel passes on the ICMP "port unreachable" that answered the send.
        raise ConnectError(f"{address} refused the datagram: {exc}", address=address) from exc
    if len(reply) > target.max_datagram:
        raise ProtocolError(
            f"{address} sent a datagram larger than max_datagram={target.max_datagram}"
        )
    return decode_datagram(target.codec, reply)


async def _send(sock: socket.socket, data: Any, limit: float | None, address: str) -> None:
    while True:
        try:
            sock.send(data)
            return
        except BlockingIOError:
            # Rare for UDP (the kernel drops rather than blocks); bounded by `send`.
            deadline = _INF if limit is None else trio.current_time() + limit
            with PhaseLimit(deadline, "send", limit, address):
                await trio.lowlevel.wait_writable(sock)
