"""A small authoritative DNS server: one handler, UDP and TCP on the same port.

Run it and ask it with dig::

    python examples/dns_server.py 5300            # 0: any free port
    dig @127.0.0.1 -p 5300 www.example.test A
    dig @127.0.0.1 -p 5300 +tcp example.test TXT

It answers for the names of a dict (A, AAAA and TXT records). The same
handler, :meth:`Zone.handle`, serves datagrams (``triocomm.serve_datagrams``,
codec ``Raw``: one datagram is one DNS message) and TCP connections
(``triocomm.serve`` with a 2-byte length prefix, as DNS over TCP frames its
messages). The only difference between the two: a UDP answer longer than
the client can take (512 bytes, or what its EDNS record says) is cut, with
the TC bit set, and the client asks again over TCP.

Names in the zone get their records (or an empty answer for a type they do
not have), other names under the zone's origin get NXDOMAIN, names outside
it REFUSED; a malformed query gets FORMERR and the server carries on.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio
from dnswire import (
    AA,
    CLASS_IN,
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    QR,
    RD,
    REFUSED,
    TC,
    TYPE_A,
    TYPE_AAAA,
    TYPE_NAMES,
    TYPE_OPT,
    TYPE_TXT,
    FormatError,
    Message,
    Question,
    Record,
    build_message,
    parse_message,
    rdata_a,
    rdata_aaaa,
    rdata_txt,
    read_header,
)

import triocomm

#: The records served by ``python examples/dns_server.py``.
DEMO_ZONE: dict[str, dict[str, list[str]]] = {
    "example.test": {
        "A": ["192.0.2.1"],
        "AAAA": ["2001:db8::1"],
        "TXT": ["v=demo1", "served by triocomm"],
    },
    "www.example.test": {"A": ["192.0.2.2", "192.0.2.3"], "AAAA": ["2001:db8::2"]},
    # Longer than 512 bytes: over UDP without EDNS it comes back truncated.
    "big.example.test": {"TXT": [f"{i:02d}-" + "x" * 90 for i in range(8)]},
}

TTL = 300
# Plain DNS over UDP carries 512 bytes; EDNS lets a client ask for more. This
# server never sends more than 1232 in a datagram (no IP fragmentation).
UDP_PLAIN, UDP_MOST = 512, 1232
_ENCODERS = {TYPE_A: rdata_a, TYPE_AAAA: rdata_aaaa, TYPE_TXT: rdata_txt}


@dataclass(frozen=True)
class Zone:
    """The records of one zone, from a dict ``{name: {"A": [...], "TXT": [...]}}``."""

    origin: str
    records: Mapping[str, Mapping[int, Sequence[bytes]]]

    @classmethod
    def from_dict(cls, origin: str, names: Mapping[str, Mapping[str, Sequence[str]]]) -> Zone:
        """Check and encode the records once, so that answering only copies bytes."""
        records: dict[str, dict[int, list[bytes]]] = {}
        for name, types in names.items():
            by_type = records.setdefault(name.lower().rstrip("."), {})
            for type_name, values in types.items():
                rtype = TYPE_NAMES[type_name]
                by_type[rtype] = [_ENCODERS[rtype](value) for value in values]
        return cls(origin.lower().rstrip("."), records)

    async def handle(self, query: bytes, peer: object) -> bytes | None:
        """The one handler of both services: a query in, the answer out (or nothing).

        ``peer`` is a :class:`triocomm.DatagramPeer` over UDP and a
        :class:`triocomm.Connection` over TCP; only the UDP size limit
        differs between the two.
        """
        udp = isinstance(peer, triocomm.DatagramPeer)
        return self.answer(query, udp)

    def answer(self, query: bytes, udp: bool) -> bytes | None:
        """The answer to the DNS message ``query``, or ``None`` when there must be none."""
        try:
            ident, flags = read_header(query)
        except FormatError:
            return None  # no header to answer with: drop it, as servers do
        if flags & QR:
            return None  # a response, not a query: never answer one (no loops)
        reply = Message(ident, QR | (flags & (RD | 0x7800)))  # keep RD and the opcode
        try:
            request = parse_message(query)
        except FormatError:
            reply.flags |= FORMERR
            return build_message(reply)
        limit = UDP_PLAIN
        for record in request.additional:
            if record.rtype == TYPE_OPT:  # EDNS: the client's datagram size
                limit = max(UDP_PLAIN, min(record.rclass, UDP_MOST))
                reply.additional.append(Record("", TYPE_OPT, UDP_MOST, 0, b""))
        reply.questions = request.questions
        reply.flags |= self._lookup(request, reply.answers)
        data = build_message(reply)
        if udp and len(data) > limit:
            # Cut to the header, question and EDNS record; TC says: ask over TCP.
            reply.answers = []
            reply.flags |= TC
            data = build_message(reply)
        return data

    def _lookup(self, request: Message, answers: list[Record]) -> int:
        """Fill ``answers`` for the request's one question; return the flags and rcode."""
        if request.opcode != 0:
            return NOTIMP
        if len(request.questions) != 1:
            return FORMERR
        (question,) = request.questions
        if question.qclass != CLASS_IN or not self._in_zone(question):
            return REFUSED
        by_type = self.records.get(question.name)
        if by_type is None:
            return AA | NXDOMAIN
        for rdata in by_type.get(question.qtype, ()):
            answers.append(Record(question.name, question.qtype, CLASS_IN, TTL, rdata))
        return AA | NOERROR

    def _in_zone(self, question: Question) -> bool:
        name = question.name
        return name == self.origin or name.endswith("." + self.origin)


@dataclass(frozen=True)
class DnsServers:
    """The two services of :func:`serve_dns`, on one port."""

    port: int
    udp: triocomm.Server
    tcp: triocomm.Server

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop both services gracefully."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.udp.shutdown, grace)
            nursery.start_soon(self.tcp.shutdown, grace)


async def serve_dns(
    zone: Zone,
    port: int,
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[DnsServers] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``zone`` over UDP and TCP on ``host``/``port`` until shut down or cancelled.

    With port 0 the UDP service takes a free port and the TCP service binds
    the same number; if that TCP port is taken, both try again elsewhere.
    """
    async with trio.open_nursery() as nursery:
        for _ in range(20 if port == 0 else 1):
            udp: triocomm.Server = await nursery.start(
                functools.partial(
                    triocomm.serve_datagrams,
                    zone.handle,
                    port,
                    host=host,
                    codec=triocomm.Raw(max_chunk=65535),
                )
            )
            try:
                tcp: triocomm.Server = await nursery.start(
                    functools.partial(
                        triocomm.serve,
                        zone.handle,
                        udp.port,
                        host=host,
                        codec=triocomm.LengthPrefixed("!H"),
                    )
                )
            except OSError as exc:
                await udp.shutdown(0)
                if port != 0 or exc.errno != errno.EADDRINUSE:
                    raise
                continue
            task_status.started(DnsServers(udp.port, udp, tcp))
            return
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")


async def main(port: int) -> None:
    zone = Zone.from_dict("example.test", DEMO_ZONE)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            servers: DnsServers = await nursery.start(serve_dns, zone, port)
            # The same port number for UDP and TCP.
            print(f"dns_server: listening on 127.0.0.1:{servers.port}", flush=True)
            async for signum in signals:
                name = signal.Signals(signum).name
                print(f"dns_server: {name} received, shutting down", flush=True)
                break
            await servers.shutdown()


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5300)
