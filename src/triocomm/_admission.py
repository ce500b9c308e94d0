"""Who a connection is from, and whether it may stay: PROXY headers and admission.

Between accept and a connection's first message, a service may have to learn
the client's real address from a PROXY protocol header (behind a load
balancer) and check that address against ``allow``/``deny`` networks and a
per-address connection limit. :class:`Admission` does both, once per
connection, in :meth:`Admission.arrive`; the service (``_server.py``) calls
it at the start of each connection's life, before the TLS handshake, and
calls :meth:`Admission.leave` when the connection ends, whatever ends it.

The header is read from the socket with ``MSG_PEEK`` and then taken exactly:
bytes after it (the first request, often in the same segment) stay in the
socket for the connection to read, so the decoder never needs them handed
over.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from ._proxy import MAX_HEADER_SIZE, ProxyHeader, ProxyHeaderError, parse_proxy_header

__all__ = ["Admission", "Arrival", "IPAddress", "Network", "Refused", "parse_networks"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What allow/deny entries may be: a network or one address, as text or object.
_NETWORK_TYPES = (
    str,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
)


def parse_networks(name: str, value: object) -> tuple[Network, ...] | None:
    """``allow``/``deny`` as given (strings or ``ipaddress`` objects) → networks, or ``None``.

    A bare address is a network of one.

    Raises:
        TypeError, ValueError: naming the option and the entry at fault.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be an iterable of networks, e.g. ['10.0.0.0/8'], got {value!r}"
        )
    networks: list[Network] = []
    for entry in value:
        if not isinstance(entry, _NETWORK_TYPES):
            raise TypeError(f"{name}: {entry!r} is not a network (a string or ipaddress object)")
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ValueError(f"{name}: {entry!r} is not a network: {exc}") from None
    return tuple(networks)


class Refused(Exception):
    """A connection that may not go on; ``kind`` is its ``ServerStats.errors`` key."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Arrival:
    """Who an admitted connection is from.

    ``remote``: the client (from the PROXY header, else the socket's peer);
    ``proxied_by``: the balancer's address, ``None`` without the protocol;
    ``counted``: the address counted against the per-address limit, if any.
    """

    remote: object
    proxied_by: object
    counted: IPAddress | None


class Admission:
    """A service's admission rules and its count of connections per client address.

    Only this class writes the counts: :meth:`arrive` adds one for a
    connection it admits, :meth:`leave` takes it away again.
    """

    def __init__(
        self,
        proxy_protocol: bool,
        allow: tuple[Network, ...] | None,
        deny: tuple[Network, ...] | None,
        max_per_ip: int | None,
        header_limit: float | None,
    ) -> None:
        self._proxy_protocol = proxy_protocol
        self._allow = allow
        self._deny = deny or ()
        self._max_per_ip = max_per_ip
        self._header_limit = math.inf if header_limit is None else header_limit
        self._counts: dict[IPAddress, int] = {}

    def connections_from(self, address: str) -> int:
        """Connections admitted from ``address`` and still open (counted with a per-IP limit)."""
        return self._counts.get(_normal(ipaddress.ip_address(address)), 0)

    async def arrive(self, stream: trio.SocketStream, accepted_at: float) -> Arrival:
        """Read the PROXY header (if the service expects one) and admit the client.

        The header must be whole by ``accepted_at`` plus the service's
        ``first_request`` limit.

        Raises:
            Refused: the header is missing, bad or late, or the address may
                not connect (now).
        """
        sock = stream.socket
        peer = _peer(sock)
        remote, proxied_by = peer, None
        if self._proxy_protocol:
            header = await self._read_header(sock, accepted_at + self._header_limit)
            if header.source is not None:
                remote = header.source
            proxied_by = peer
        return Arrival(remote, proxied_by, self._admit(remote))

    def leave(self, arrival: Arrival) -> None:
        """An admitted connection has ended: it no longer counts against its address."""
        address = arrival.counted
        if address is not None:
            left = self._counts[address] - 1
            if left:
                self._counts[address] = left
            else:
                del self._counts[address]  # the dict holds only addresses connected now

    def _admit(self, remote: object) -> IPAddress | None:
        address = _ip_of(remote)
        if address is None:
            return None  # a Unix-socket peer: never filtered
        if any(address in network for network in self._deny) or (
            self._allow is not None and not any(address in network for network in self._allow)
        ):
            raise Refused("denied", f"{address} is not allowed (allow/deny)")
        if self._max_per_ip is None:
            return None
        count = self._counts.get(address, 0)
        if count >= self._max_per_ip:
            raise Refused(
                "per_ip_limit",
                f"{count} connections already open from {address} "
                f"(max_connections_per_ip={self._max_per_ip})",
            )
        self._counts[address] = count + 1
        return address

    async def _read_header(self, sock: trio.socket.SocketType, deadline: float) -> ProxyHeader:
        with trio.move_on_at(deadline):
            try:
                return await _read_proxy_header(sock)
            except ProxyHeaderError as exc:
                raise Refused("proxy_protocol", f"bad PROXY header: {exc}") from None
            except OSError as exc:
                raise Refused(
                    "connection_lost", f"lost while reading the PROXY header: {exc}"
                ) from None
        raise Refused(
            "proxy_protocol", f"no whole PROXY header within first_request={self._header_limit:g}s"
        )


async def _read_proxy_header(sock: trio.socket.SocketType) -> ProxyHeader:
    """Read exactly one PROXY header from ``sock``, leaving what follows it in the socket."""
    taken = bytearray()
    while True:
        # Bounded: parse_proxy_header refuses a header past MAX_HEADER_SIZE,
        # so fewer than that many bytes are ever taken before it decides.
        seen = await sock.recv(MAX_HEADER_SIZE - len(taken), socket.MSG_PEEK)
        if not seen:
            raise ProxyHeaderError(
                "closed in the middle of the header" if taken else "closed before any header"
            )
        header = parse_proxy_header(taken + seen)
        if header is not None:
            await _take(sock, header.length - len(taken))
            return header
        # Not complete: every byte seen is header (the parser's rule 1), so
        # take them all and wait for the rest.
        await _take(sock, len(seen))
        taken += seen


async def _take(sock: trio.socket.SocketType, count: int) -> None:
    # The bytes were peeked, so they are in the socket: one read takes them.
    got = await sock.recv(count)
    if len(got) != count:
        raise ProxyHeaderError(f"took {len(got)} of {count} header bytes already received")


def _peer(sock: trio.socket.SocketType) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _ip_of(address: object) -> IPAddress | None:
    if not isinstance(address, tuple) or not isinstance(address[0], str):
        return None
    try:
        return _normal(ipaddress.ip_address(address[0].partition("%")[0]))
    except ValueError:
        return None


def _normal(address: IPAddress) -> IPAddress:
    # A dual-stack socket shows IPv4 clients as ::ffff:a.b.c.d; they are IPv4 clients.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
