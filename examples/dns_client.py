"""A small DNS resolver on ``Target.udp``, falling back to TCP for long answers.

Ask a DNS server (dnsmasq, ``dns_server.py``, any other) as dig would::

    python examples/dns_client.py 127.0.0.1:5300 www.example.test A
    python examples/dns_client.py [::1]:53 example.com AAAA

Each query goes out as one datagram (``client.request`` on a UDP target, a
connected socket of its own per exchange). An answer too long for a
datagram comes back with the TC bit set and no records; the resolver then
asks again over TCP (``Target`` with a 2-byte length prefix), as RFC 7766
says. A datagram lost on the way, or its answer, makes the exchange time
out (``CommTimeout``, phase ``first_response``); the resolver sends the
query again, up to ``attempts`` times, each with a fresh id, as resolvers
do. A reply whose id or question does not match the query is refused.
"""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass

import trio
from dnswire import (
    RCODE_NAMES,
    TC,
    TYPE_NAMES,
    FormatError,
    Message,
    Question,
    parse_message,
    query,
    show_rdata,
)

import triocomm

#: How long one exchange waits for its answer before the query is sent again.
ATTEMPT_TIMEOUT = 1.0
# TCP retransmits what is lost by itself, and dnsmasq answers TCP from a
# child it forks per connection: that wait is bounded, never resent.
TCP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Answer:
    """What a lookup found: the response code, the records, and how it was asked."""

    rcode: int
    records: list[tuple[str, str, int, str]]  # name, type, TTL, data as dig shows it
    transport: str  # "udp", or "tcp" after a truncated UDP answer
    attempts: int

    @property
    def status(self) -> str:
        """The response code's name, as dig prints it (``NOERROR``, ``NXDOMAIN`` ...)."""
        return RCODE_NAMES.get(self.rcode, str(self.rcode))


class Resolver:
    """Queries one DNS server over UDP, and over TCP when an answer is truncated."""

    def __init__(
        self,
        client: triocomm.Client,
        host: str,
        port: int = 53,
        *,
        attempts: int = 3,
        timeout: float = ATTEMPT_TIMEOUT,
        tcp_timeout: float = TCP_TIMEOUT,
    ) -> None:
        self.client = client
        self.attempts = attempts
        # Raw: one datagram is one DNS message, parsed here (dnswire.py).
        # ``timeout`` is one datagram's wait: a lost one is sent again.
        self.udp = triocomm.Target.udp(
            host, port, triocomm.Raw(), timeouts=triocomm.Timeouts(first_response=timeout)
        )
        self.tcp = triocomm.Target(
            host,
            port,
            triocomm.LengthPrefixed("!H"),
            timeouts=triocomm.Timeouts(first_response=tcp_timeout, connect=tcp_timeout),
        )

    async def lookup(self, name: str, type_name: str = "A") -> Answer:
        """Ask for the ``type_name`` records (A, AAAA, TXT) of ``name``.

        Raises:
            triocomm.CommTimeout: no answer after ``attempts`` datagrams.
            triocomm.ProtocolError: the server's answer was malformed or did
                not match the question.
        """
        qtype = TYPE_NAMES[type_name]
        question = Question(name.lower().rstrip("."), qtype)
        for attempt in range(1, self.attempts + 1):
            ident = secrets.randbelow(1 << 16)
            data = query(ident, question.name, qtype)
            try:
                reply = self._check(await self.client.request(self.udp, data), ident, question)
            except triocomm.CommTimeout:
                if attempt == self.attempts:
                    raise
                continue  # lost on the way there or back: ask again
            if not reply.flags & TC:
                return _answer(reply, "udp", attempt)
            reply = self._check(await self.client.request(self.tcp, data), ident, question)
            return _answer(reply, "tcp", attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check(data: bytes, ident: int, question: Question) -> Message:
        try:
            reply = parse_message(data)
        except FormatError as exc:
            raise triocomm.ProtocolError(f"malformed DNS answer: {exc}") from exc
        if reply.id != ident or reply.questions != [question]:
            raise triocomm.ProtocolError("the answer does not match the question")
        return reply


def _answer(reply: Message, transport: str, attempts: int) -> Answer:
    names = {number: name for name, number in TYPE_NAMES.items()}
    records = [
        (r.name, names.get(r.rtype, str(r.rtype)), r.ttl, show_rdata(r)) for r in reply.answers
    ]
    return Answer(reply.rcode, records, transport, attempts)


def parse_server(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` (the port defaults to 53)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.removeprefix(":") or 53)
    host, _, port = text.partition(":")
    return host, int(port or 53)


async def main(server: str, name: str, type_name: str) -> int:
    host, port = parse_server(server)
    async with triocomm.open_client() as client:
        answer = await Resolver(client, host, port).lookup(name, type_name)
    print(f";; status: {answer.status}, over {answer.transport}")
    for record_name, rtype, ttl, data in answer.records:
        print(f"{record_name}.\t{ttl}\tIN\t{rtype}\t{data}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: dns_client.py SERVER[:PORT] NAME [A|AAAA|TXT]")
    sys.exit(trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else "A"))
