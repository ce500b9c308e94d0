"""The PROXY protocol parser on plain bytes: v1, v2, and its rules under fuzzing.

Rules (``_proxy.py``): ``None`` only while every byte given can still be part
of a header; bounded; bytes after the header never looked at.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triocomm._proxy import (
    MAX_HEADER_SIZE,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse_proxy_header,
)


def v1(source: str, destination: str, sport: int, dport: int) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(
    source: str | None,
    destination: str | None,
    sport: int = 0,
    dport: int = 0,
    *,
    command: int = 1,
    tlvs: bytes = b"",
    family: int | None = None,
) -> bytes:
    if source is None or destination is None:
        block = b""
        fam = 0 if family is None else family
        if fam == 3:
            block = b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")
    else:
        a, b = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        fam = 1 if a.version == 4 else 2
        block = a.packed + b.packed + struct.pack("!HH", sport, dport)
    body = block + tlvs
    return (
        V2_SIGNATURE + bytes([0x20 | command, (fam << 4) | 1]) + struct.pack("!H", len(body)) + body
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# -- what a header says --------------------------------------------------------


def test_v1_tcp4() -> None:
    data = v1("192.0.2.7", "10.0.0.1", 51234, 443)
    assert parse_proxy_header(data + b"rest") == ProxyHeader(
        1, ("192.0.2.7", 51234), ("10.0.0.1", 443), len(data)
    )


def test_v1_tcp6_gives_socket_style_addresses() -> None:
    header = parse_proxy_header(v1("2001:db8::7", "::1", 1, 65535))
    assert header is not None
    assert header.source == ("2001:db8::7", 1, 0, 0)
    assert header.destination == ("::1", 65535, 0, 0)


def test_v1_unknown_names_no_client() -> None:
    data = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    assert parse_proxy_header(data + b"x") == ProxyHeader(1, None, None, len(data))
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, 15)


def test_v2_ipv4_ipv6_and_tlvs_skipped() -> None:
    data = v2("198.51.100.2", "10.1.2.3", 40000, 7000, tlvs=tlv(0x05, b"x" * 20) + tlv(0xEA, b""))
    assert parse_proxy_header(data + b"\x00\x00\x00\x05hello") == ProxyHeader(
        2, ("198.51.100.2", 40000), ("10.1.2.3", 7000), len(data)
    )
    data = v2("2001:db8::1", "2001:db8::2", 1, 2)
    header = parse_proxy_header(data)
    assert header == ProxyHeader(2, ("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 0, 0), len(data))


def test_v2_local_and_unspec_and_unix_name_no_client() -> None:
    # LOCAL, as a balancer's health check sends it; addresses, if any, are ignored.
    local = v2("192.0.2.1", "192.0.2.2", 1, 2, command=0)
    assert parse_proxy_header(local) == ProxyHeader(2, None, None, len(local))
    assert parse_proxy_header(v2(None, None)) == ProxyHeader(2, None, None, 16)
    unix = v2(None, None, family=3)
    assert parse_proxy_header(unix) == ProxyHeader(2, None, None, len(unix))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # v6 in a TCP4 line
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY \x00",
        b"PROXY " + b"A" * 101,  # 107 bytes, no CRLF
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12,  # family 4
        V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,  # datagram
        V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8,  # too short for IPv4
        V2_SIGNATURE + b"\x21\x11\x00\x0e" + b"\x00" * 14,  # a 2-byte TLV stub
        V2_SIGNATURE + b"\x21\x11\x00\x0f" + b"\x00" * 12 + b"\x01\x00\x09",  # TLV past the end
        V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_HEADER_SIZE),  # oversized
        b"\r\n\r\n\x00\r\nQUIX\n",
    ],
)
def test_bad_headers_raise(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(data)


def test_size_bound() -> None:
    biggest = v2("192.0.2.1", "192.0.2.2", tlvs=tlv(0xEE, b"x" * (MAX_HEADER_SIZE - 31)))
    assert len(biggest) == MAX_HEADER_SIZE
    assert parse_proxy_header(biggest) is not None
    with pytest.raises(ProxyHeaderError, match="limit"):
        parse_proxy_header(
            v2("192.0.2.1", "192.0.2.2", tlvs=tlv(0xEE, b"x" * (MAX_HEADER_SIZE - 30)))
        )
    # v1's own bound: 107 bytes with the CRLF.
    longest = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(longest) == 107
    assert parse_proxy_header(longest) is not None
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n")


# -- fuzzing -------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    addresses = draw(st.sampled_from([ipv4, ipv6]))
    source, destination = draw(addresses), draw(addresses)
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        return v1(source, destination, sport, dport)
    tlvs = b"".join(
        tlv(kind, value)
        for kind, value in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)
        )
    )
    return v2(source, destination, sport, dport, command=draw(st.integers(0, 1)), tlvs=tlvs)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_garbage_never_raises_anything_else(data: bytes) -> None:
    try:
        header = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    assert header is None or 0 < header.length <= len(data)


@given(headers(), st.binary(max_size=64))
@settings(max_examples=300)
def test_truncated_at_every_byte_needs_more_and_rest_is_left_alone(
    header_bytes: bytes, rest: bytes
) -> None:
    for cut in range(len(header_bytes)):
        assert parse_proxy_header(header_bytes[:cut]) is None, cut
    whole = parse_proxy_header(header_bytes + rest)
    assert whole is not None
    assert whole.length == len(header_bytes)
    assert parse_proxy_header(header_bytes) == whole


@given(headers(), st.binary(min_size=1, max_size=64), st.integers(1, 8))
@settings(max_examples=100)
def test_split_at_every_byte_as_a_reader_sees_it(
    header_bytes: bytes, rest: bytes, step: int
) -> None:
    """A reader that takes every byte of an unfinished header ends exactly at the header's end.

    The first read ends at every possible byte; the later ones bring ``step`` bytes each.
    """
    stream = header_bytes + rest
    expected = parse_proxy_header(header_bytes)
    for split in range(1, len(stream)):
        taken = b""
        offered = stream[:split]
        result = None
        for _ in range(len(stream) + 1):
            result = parse_proxy_header(taken + offered)
            if result is not None:
                break
            taken += offered  # rule 1: every byte offered is header
            offered = stream[len(taken) : len(taken) + step]
            assert offered, "needed more than the header"
        assert result == expected
        assert result is not None
        assert result.length == len(header_bytes)


@given(headers(), st.integers(0, 200), st.binary(min_size=1, max_size=8))
@settings(max_examples=300)
def test_corrupted_headers_fail_or_parse_never_overread(
    header_bytes: bytes, at: int, junk: bytes
) -> None:
    at = at % len(header_bytes)
    corrupted = header_bytes[:at] + junk + header_bytes[at + len(junk) :]
    try:
        header = parse_proxy_header(corrupted)
    except ProxyHeaderError:
        return
    assert header is None or header.length <= len(corrupted)
