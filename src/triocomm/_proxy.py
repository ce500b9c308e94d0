"""The PROXY protocol header, parsed from bytes (sans-I/O).

A load balancer that passes TCP through (HAProxy, AWS NLB, nginx's stream
module) can start each connection with a header naming the client it came
from: version 1 is one line of text, version 2 a binary block. This module
only looks at bytes: :func:`parse_proxy_header` takes everything received so
far and says "need more" (``None``), returns the :class:`ProxyHeader`, or
raises :class:`ProxyHeaderError`. The service reads the socket around it
(``_admission.py``).

Rules it keeps (tested, fuzzed):

1. **``None`` means every byte given belongs to the header**, so a reader may
   consume all of them and wait for more without ever swallowing the first
   request's bytes.
2. **Bounded**: a header is at most :data:`MAX_HEADER_SIZE` bytes (v1's own
   bound is 107); anything longer is an error, never a bigger buffer.
3. Bytes after the header are never looked at: ``ProxyHeader.length`` says
   where the header ends.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["MAX_HEADER_SIZE", "ProxyHeader", "ProxyHeaderError", "parse_proxy_header"]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The specification's bound for a v1 line, CRLF included.
V1_MAX = 107
#: The largest header accepted (v2 with its TLVs); the AWS and HAProxy ones
#: are well under a kilobyte.
MAX_HEADER_SIZE = 4096
_V2_FIXED = 16
# v2 address block sizes by family: INET, INET6, UNIX.
_V2_BLOCK = {1: 12, 2: 36, 3: 216}


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header (or one past the size bound)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source``/``destination`` are socket-style addresses (``(host, port)``
    for IPv4, ``(host, port, 0, 0)`` for IPv6, as ``getpeername`` gives), or
    ``None`` when the header names no client (v1 ``UNKNOWN``, v2 ``LOCAL`` as
    in a balancer's own health check, or a family other than IP): the
    connection's own addresses then stand.
    """

    version: int
    source: tuple[str, int] | tuple[str, int, int, int] | None
    destination: tuple[str, int] | tuple[str, int, int, int] | None
    length: int


def parse_proxy_header(data: bytes | bytearray) -> ProxyHeader | None:
    """Parse the header at the start of ``data``; ``None``: not complete yet.

    ``None`` is returned only while every byte of ``data`` can still be part
    of a header; bytes after a complete header are left alone
    (``ProxyHeader.length`` is where it ends).

    Raises:
        ProxyHeaderError: ``data`` does not start with a valid header, or the
            header would be longer than :data:`MAX_HEADER_SIZE`.
    """
    data = bytes(data[:MAX_HEADER_SIZE])
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
        raise ProxyHeaderError(f"not a PROXY header: starts with {data[:16]!r}")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        # The line may still end, unless a lone LF or the size says otherwise.
        if b"\n" in data[:V1_MAX] or len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line not ended by CRLF within {V1_MAX} bytes")
        # A CR may end what came so far: its LF is yet to come.
        _check_v1_text(data[:-1] if data.endswith(b"\r") else data)
        return None
    line = data[:end]
    _check_v1_text(line)
    parts = line.split(b" ")
    if len(parts) < 2:
        raise ProxyHeaderError("PROXY v1 line without a protocol")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None, end + 2)
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"bad PROXY v1 line: {line!r}")
    version = 4 if parts[1] == b"TCP4" else 6
    source = _v1_address(parts[2], parts[4], version)
    destination = _v1_address(parts[3], parts[5], version)
    return ProxyHeader(1, source, destination, end + 2)


def _check_v1_text(data: bytes) -> None:
    # Printable ASCII after the prefix: a stray binary byte is not a v1 header.
    if any(byte < 0x20 or byte > 0x7E for byte in data):
        raise ProxyHeaderError(f"PROXY v1 line with a non-printable byte: {data[:V1_MAX]!r}")


def _v1_address(
    host: bytes, port: bytes, version: int
) -> tuple[str, int] | tuple[str, int, int, int]:
    try:
        address = ipaddress.ip_address(host.decode("ascii"))
    except ValueError:
        raise ProxyHeaderError(f"bad address in PROXY v1 line: {host!r}") from None
    if address.version != version:
        raise ProxyHeaderError(f"IPv{address.version} address in a TCP{version} line: {host!r}")
    if not port.isdigit() or len(port) > 5 or (len(port) > 1 and port[:1] == b"0"):
        raise ProxyHeaderError(f"bad port in PROXY v1 line: {port!r}")
    return _socket_address(address, int(port))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
        raise ProxyHeaderError(f"not a PROXY header: starts with {data[:16]!r}")
    if len(data) < _V2_FIXED:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    family, transport = data[13] >> 4, data[13] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version}")
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    if family > 3 or transport > 1:
        raise ProxyHeaderError(f"PROXY v2 header for family {family}, transport {transport}")
    length = _V2_FIXED + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER_SIZE:
        raise ProxyHeaderError(f"PROXY v2 header of {length} bytes (limit {MAX_HEADER_SIZE})")
    if len(data) < length:
        return None
    block = _V2_BLOCK.get(family, 0)
    if length - _V2_FIXED < block:
        raise ProxyHeaderError(f"PROXY v2 header too short for its addresses ({length} bytes)")
    _check_tlvs(data[_V2_FIXED + block : length])
    if command == 0 or family not in (1, 2):
        return ProxyHeader(2, None, None, length)  # LOCAL, or no IP client to name
    size = 4 if family == 1 else 16
    body = data[_V2_FIXED : _V2_FIXED + block]
    ports = body[2 * size :]
    source = _socket_address(ipaddress.ip_address(body[:size]), int.from_bytes(ports[:2], "big"))
    destination = _socket_address(
        ipaddress.ip_address(body[size : 2 * size]), int.from_bytes(ports[2:4], "big")
    )
    return ProxyHeader(2, source, destination, length)


def _check_tlvs(tlvs: bytes) -> None:
    """Walk the TLVs (skipped, not used) to check they fill the header exactly."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyHeaderError("PROXY v2 header with a truncated TLV")
        offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyHeaderError("PROXY v2 header with a TLV past its end")


def _socket_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
) -> tuple[str, int] | tuple[str, int, int, int]:
    if port > 65535:
        raise ProxyHeaderError(f"port {port} out of range")
    if address.version == 4:
        return (str(address), port)
    return (str(address), port, 0, 0)
