"""The DNS wire format (RFC 1035), the part a small server and resolver need.

Shared by ``dns_server.py`` and ``dns_client.py``. Pure functions on bytes,
no I/O: :func:`parse_message` reads a whole DNS message (as one UDP datagram
or one TCP frame carries it, name compression included) and
:func:`build_message` writes one. A malformed message raises
:class:`FormatError`, which a server answers with FORMERR.

Only what the examples use is modelled: the header, questions, and resource
records whose data stays raw bytes (:func:`rdata_a`, :func:`rdata_txt` ...
encode the usual types, :func:`show_rdata` prints them).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

# Record types and classes used here.
TYPE_A, TYPE_AAAA, TYPE_TXT, TYPE_OPT = 1, 28, 16, 41
TYPE_NAMES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "TXT": TYPE_TXT}
CLASS_IN = 1
# Response codes.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
# Header flag bits.
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_QUESTION_FIXED = struct.Struct("!HH")
# A compressed name may point backwards at most this many times (a loop guard).
_MAX_POINTERS = 32
MAX_NAME = 255


class FormatError(ValueError):
    """The bytes are not a well-formed DNS message."""


@dataclass(frozen=True)
class Question:
    """One entry of the question section: ``name`` in lower case, without the final dot."""

    name: str
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Record:
    """One resource record; ``rdata`` is the type's data as bytes."""

    name: str
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes


@dataclass
class Message:
    """A DNS message: the header's fields and the four sections."""

    id: int
    flags: int
    questions: list[Question] = field(default_factory=list)
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    additional: list[Record] = field(default_factory=list)

    @property
    def rcode(self) -> int:
        """The response code (the low four bits of the flags)."""
        return self.flags & 0xF

    @property
    def opcode(self) -> int:
        """The kind of query (0: a standard query)."""
        return (self.flags >> 11) & 0xF


# -- reading -----------------------------------------------------------------


def read_header(data: bytes) -> tuple[int, int]:
    """``(id, flags)`` of a message, or :class:`FormatError` if it has no whole header."""
    if len(data) < _HEADER.size:
        raise FormatError(f"{len(data)} bytes: shorter than a DNS header")
    ident, flags = struct.unpack_from("!HH", data)
    return ident, flags


def parse_message(data: bytes) -> Message:
    """Read a whole DNS message; anything malformed or left over raises :class:`FormatError`."""
    ident, flags, qdcount, ancount, nscount, arcount = _unpack(_HEADER, data, 0)
    message = Message(ident, flags)
    offset = _HEADER.size
    for _ in range(qdcount):
        name, offset = read_name(data, offset)
        qtype, qclass = _unpack(_QUESTION_FIXED, data, offset)
        offset += _QUESTION_FIXED.size
        message.questions.append(Question(name, qtype, qclass))
    for section, count in (
        (message.answers, ancount),
        (message.authority, nscount),
        (message.additional, arcount),
    ):
        for _ in range(count):
            record, offset = _read_record(data, offset)
            section.append(record)
    if offset != len(data):
        raise FormatError(f"{len(data) - offset} bytes after the last record")
    return message


def _unpack(layout: struct.Struct, data: bytes, offset: int) -> tuple[int, ...]:
    if offset + layout.size > len(data):
        raise FormatError(f"message ends inside a field at byte {offset}")
    return layout.unpack_from(data, offset)


def _read_record(data: bytes, offset: int) -> tuple[Record, int]:
    name, offset = read_name(data, offset)
    rtype, rclass, ttl, size = _unpack(_RR_FIXED, data, offset)
    offset += _RR_FIXED.size
    if offset + size > len(data):
        raise FormatError(f"record data of {size} bytes runs past the end of the message")
    return Record(name, rtype, rclass, ttl, data[offset : offset + size]), offset + size


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at ``offset``: ``(name, offset after it)``."""
    labels: list[str] = []
    length = 0
    end = None  # where the name ends in the message, once a pointer was followed
    for _ in range(_MAX_POINTERS):
        while True:
            if offset >= len(data):
                raise FormatError("message ends inside a name")
            size = data[offset]
            if size & 0xC0 == 0xC0:  # a pointer to an earlier name
                if offset + 1 >= len(data):
                    raise FormatError("message ends inside a name pointer")
                target = ((size & 0x3F) << 8) | data[offset + 1]
                if end is None:
                    end = offset + 2
                if target >= offset:
                    raise FormatError("a name pointer that does not point backwards")
                offset = target
                break
            if size & 0xC0:
                raise FormatError(f"unknown label type 0x{size:02x}")
            offset += 1
            if size == 0:
                return ".".join(labels), offset if end is None else end
            label = data[offset : offset + size]
            if len(label) < size:
                raise FormatError("message ends inside a label")
            length += size + 1
            if length > MAX_NAME:
                raise FormatError(f"a name longer than {MAX_NAME} bytes")
            labels.append(label.decode("ascii", "backslashreplace").lower())
            offset += size
    raise FormatError("too many name pointers (a loop?)")


# -- writing -----------------------------------------------------------------


def encode_name(name: str) -> bytes:
    """The wire form of ``name`` (uncompressed; a final dot is optional)."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {name!r} is longer than {MAX_NAME} bytes")
    return bytes(out)


def build_message(message: Message) -> bytes:
    """The wire form of ``message``.

    A record whose name is the first question's is written as a pointer to
    it (RFC 1035 compression), which is all the compression these examples need.
    """
    out = bytearray(
        _HEADER.pack(
            message.id,
            message.flags,
            len(message.questions),
            len(message.answers),
            len(message.authority),
            len(message.additional),
        )
    )
    first = message.questions[0].name if message.questions else None
    for question in message.questions:
        out += encode_name(question.name)
        out += _QUESTION_FIXED.pack(question.qtype, question.qclass)
    for record in (*message.answers, *message.authority, *message.additional):
        # 0xC00C: a pointer to byte 12, where the first question's name starts.
        out += b"\xc0\x0c" if record.name == first else encode_name(record.name)
        out += _RR_FIXED.pack(record.rtype, record.rclass, record.ttl, len(record.rdata))
        out += record.rdata
    return bytes(out)


def rdata_a(address: str) -> bytes:
    """The data of an A record."""
    return ipaddress.IPv4Address(address).packed


def rdata_aaaa(address: str) -> bytes:
    """The data of an AAAA record."""
    return ipaddress.IPv6Address(address).packed


def rdata_txt(text: str) -> bytes:
    """The data of a TXT record: the text as character-strings of at most 255 bytes."""
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return b"".join(bytes([len(chunk)]) + chunk for chunk in chunks)


def show_rdata(record: Record) -> str:
    """The record's data as dig prints it (A, AAAA, TXT; other types as hex)."""
    if record.rtype == TYPE_A and len(record.rdata) == 4:
        return str(ipaddress.IPv4Address(record.rdata))
    if record.rtype == TYPE_AAAA and len(record.rdata) == 16:
        return str(ipaddress.IPv6Address(record.rdata))
    if record.rtype == TYPE_TXT:
        parts, offset = [], 0
        while offset < len(record.rdata):
            size = record.rdata[offset]
            parts.append(record.rdata[offset + 1 : offset + 1 + size].decode(errors="replace"))
            offset += 1 + size
        return "".join(parts)
    return record.rdata.hex()


def query(ident: int, name: str, qtype: int, *, recursion: bool = True) -> bytes:
    """A standard query for ``name`` / ``qtype`` (class IN), as bytes."""
    flags = RD if recursion else 0
    return build_message(Message(ident, flags, [Question(name.lower().rstrip("."), qtype)]))
