"""examples/dns_server.py: its answers, its wire format, then the real dig over UDP and TCP."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import trio
from dns_server import DEMO_ZONE, DnsServers, Zone, serve_dns
from dnswire import (
    FORMERR,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    QR,
    REFUSED,
    TC,
    TYPE_A,
    TYPE_AAAA,
    TYPE_OPT,
    TYPE_TXT,
    FormatError,
    Message,
    Question,
    Record,
    build_message,
    parse_message,
    query,
    read_name,
    show_rdata,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import triocomm

ZONE = Zone.from_dict("example.test", DEMO_ZONE)


def ask(name: str, qtype: int, *, udp: bool = True, ident: int = 7) -> Message:
    data = ZONE.answer(query(ident, name, qtype), udp)
    assert data is not None
    return parse_message(data)


# -- answers, on bytes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "qtype", "rcode", "values"),
    [
        ("example.test", TYPE_A, NOERROR, ["192.0.2.1"]),
        ("Example.TEST.", TYPE_AAAA, NOERROR, ["2001:db8::1"]),
        ("example.test", TYPE_TXT, NOERROR, ["v=demo1", "served by triocomm"]),
        ("www.example.test", TYPE_A, NOERROR, ["192.0.2.2", "192.0.2.3"]),
        ("www.example.test", TYPE_TXT, NOERROR, []),  # the name exists, the type not
        ("nope.example.test", TYPE_A, NXDOMAIN, []),
        ("example.org", TYPE_A, REFUSED, []),
    ],
)
def test_answers(name: str, qtype: int, rcode: int, values: list[str]) -> None:
    reply = ask(name, qtype)
    assert reply.id == 7
    assert reply.flags & QR
    assert reply.rcode == rcode
    assert reply.questions == [Question(name.lower().rstrip("."), qtype)]
    assert [show_rdata(r) for r in reply.answers] == values
    assert all(r.ttl == 300 and r.rtype == qtype for r in reply.answers)


def test_a_long_udp_answer_is_truncated_unless_edns_allows_it() -> None:
    cut = ask("big.example.test", TYPE_TXT)
    assert cut.flags & TC
    assert cut.answers == []
    whole = ask("big.example.test", TYPE_TXT, udp=False)
    assert not whole.flags & TC
    assert len(whole.answers) == 8
    opt = Record("", TYPE_OPT, 4096, 0, b"")
    edns = Message(9, 0, [Question("big.example.test", TYPE_TXT)], additional=[opt])
    data = ZONE.answer(build_message(edns), True)
    assert data is not None
    assert len(data) <= 1232
    reply = parse_message(data)
    assert len(reply.answers) == 8
    assert [r.rclass for r in reply.additional] == [1232]


@pytest.mark.parametrize(
    ("data", "rcode"),
    [
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc", FORMERR),  # cut name
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", FORMERR),
        (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01junk", FORMERR),
        (b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01" * 1, FORMERR),
        (b"\x12\x34\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00", FORMERR),  # no question
        (b"\x12\x34\x11\x00\x00\x00\x00\x00\x00\x00\x00\x00", NOTIMP),  # opcode 2
    ],
)
def test_malformed_queries_get_formerr(data: bytes, rcode: int) -> None:
    reply = ZONE.answer(data, True)
    assert reply is not None
    ident, flags = struct.unpack_from("!HH", reply)
    assert ident == 0x1234
    assert flags & QR
    assert flags & 0xF == rcode


def test_no_answer_without_a_header_or_to_a_response() -> None:
    assert ZONE.answer(b"\x12\x34\x01", True) is None
    assert ZONE.answer(b"\x12\x34\x81\x00" + b"\x00" * 8, True) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_any_bytes_get_an_answer_or_none_never_an_exception(data: bytes, udp: bool) -> None:
    reply = ZONE.answer(data, udp)
    if reply is not None:
        message = parse_message(reply)
        assert message.id == struct.unpack_from("!H", data)[0]
        assert message.flags & QR


def test_name_pointers_cannot_loop() -> None:
    with pytest.raises(FormatError):
        read_name(b"\x00" * 12 + b"\xc0\x0c", 12)  # points at itself
    assert read_name(b"\x03abc\x00\xc0\x00", 5) == ("abc", 7)


# -- the real dig ------------------------------------------------------------------


@pytest.fixture
async def dns() -> AsyncIterator[DnsServers]:
    async with trio.open_nursery() as nursery:
        servers: DnsServers = await nursery.start(serve_dns, ZONE, 0)
        yield servers
        await servers.shutdown()
    for server in (servers.udp, servers.tcp):
        assert sum(server.stats.errors.values()) == 0


async def dig(port: int, *args: str) -> tuple[str, str, list[list[str]]]:
    """Run dig; return its status, its flags and the answer section's rows."""
    command = ["dig", "@127.0.0.1", "-p", str(port), "+time=5", "+tries=1", *args]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    out = result.stdout.decode()
    status = re.search(r"status: (\w+)", out)
    flags = re.search(r";; flags: ([\w ]*);", out)
    assert status is not None, out
    assert flags is not None, out
    answer = (
        out.split(";; ANSWER SECTION:\n")[1].split("\n\n")[0] if "ANSWER SECTION" in out else ""
    )
    rows = [line.split(None, 4) for line in answer.splitlines()]
    return status.group(1), flags.group(1), rows


EXPECTED = [
    (name, type_name, value)
    for name, types in DEMO_ZONE.items()
    for type_name, values in types.items()
    for value in values
]


@pytest.mark.needs_binary("dig")
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_dig_gets_every_record(dns: DnsServers, transport: str) -> None:
    for name, types in DEMO_ZONE.items():
        for type_name, values in types.items():
            status, flags, rows = await dig(dns.port, transport, name, type_name)
            assert status == "NOERROR"
            assert "aa" in flags.split()
            shown = [v.strip('"') if type_name == "TXT" else v for *_, v in rows]
            assert sorted(shown) == sorted(values)
            assert all(r[:4] == [name + ".", "300", "IN", type_name] for r in rows)
    assert dns.tcp.stats.sessions > 0 if transport == "+tcp" else dns.udp.stats.sessions > 0


@pytest.mark.needs_binary("dig")
async def test_dig_sees_nxdomain_refused_and_truncation(dns: DnsServers) -> None:
    assert (await dig(dns.port, "nope.example.test", "A"))[0] == "NXDOMAIN"
    assert (await dig(dns.port, "+tcp", "example.org", "A"))[0] == "REFUSED"
    status, flags, rows = await dig(dns.port, "+noedns", "+ignore", "big.example.test", "TXT")
    assert "tc" in flags.split()
    assert rows == []
    # Without +ignore, dig asks again over TCP, as a resolver does.
    sessions = dns.tcp.stats.sessions
    status, _, rows = await dig(dns.port, "+noedns", "big.example.test", "TXT")
    assert status == "NOERROR"
    assert len(rows) == 8
    assert dns.tcp.stats.sessions == sessions + 1


@pytest.mark.needs_binary("dig")
async def test_malformed_queries_get_formerr_over_udp_and_tcp(dns: DnsServers) -> None:
    bad = b"\xbe\xef\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fnot a name"
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", dns.port))
        await sock.send(bad)
        with trio.fail_after(10):
            reply = await sock.recv(512)
    assert reply[:2] == b"\xbe\xef"
    assert reply[3] & 0xF == FORMERR
    async with triocomm.open_client() as client:
        target = triocomm.Target("127.0.0.1", dns.port, triocomm.LengthPrefixed("!H"))
        reply = await client.request(target, bad)
    assert reply[:2] == b"\xbe\xef"
    assert reply[3] & 0xF == FORMERR
    # The server carries on.
    assert (await dig(dns.port, "www.example.test", "AAAA"))[2][0][4] == "2001:db8::2"
