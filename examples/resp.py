"""RESP2, the Redis serialization protocol, as a triocomm codec.

This module shows how a real protocol becomes a :class:`triocomm.Codec` using
nothing but the public framing API: :class:`Resp` is an immutable description
of the format, and :meth:`Resp.decoder` makes the per-connection
:class:`RespDecoder` that cuts a byte stream into values. Nothing here does
I/O or imports Trio; ``examples/redis_client.py`` and
``examples/redis_server.py`` put it on the wire.

Python values and RESP2 types map one to one, so what one side encodes the
other side decodes to an equal value:

==========================  ==================================================
Python                      RESP2
==========================  ==================================================
``str``                     simple string ``+OK\\r\\n``
:class:`ErrorReply`         error ``-ERR unknown command\\r\\n``
``int``                     integer ``:42\\r\\n`` (signed 64-bit)
``bytes``                   bulk string ``$5\\r\\nhello\\r\\n``
``None``                    null bulk string ``$-1\\r\\n`` (``*-1\\r\\n``, the
                            null array, also decodes to ``None``)
``list``                    array ``*2\\r\\n...`` of any of these
==========================  ==================================================

A server built on ``triocomm.serve`` cannot return ``None`` for a null
reply, because ``serve`` reads ``None`` as "send no reply"; it returns
:data:`NULL` instead, which encodes exactly like ``None``.

Commands are arrays of bulk strings (:func:`command` builds one). A server may
also accept *inline* commands, the plain text lines a person types into telnet
(``PING\\r\\n``): pass ``Resp(inline=True)``.

Every size is bounded, and an oversized value is rejected as soon as its size
is known (a bulk string or array header announcing too much fails before any
of its body is buffered), so a peer cannot make a decoder hold more than
``max_message`` bytes or build more than ``max_items`` objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from triocomm import FrameTooLarge, ProtocolError

__all__ = ["NULL", "ErrorReply", "Null", "Resp", "RespDecoder", "RespValue", "command"]

KiB = 1024
MiB = 1024 * KiB

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A length or integer line never needs more characters than "-9223372036854775808".
_MAX_DIGITS = 20
_CRLF = b"\r\n"


@dataclass(frozen=True)
class ErrorReply:
    """A RESP error value, such as ``-WRONGTYPE Operation against a key ...``.

    It is a value, not an exception: a server sends it as an ordinary reply,
    and one command of a pipeline can fail while the others succeed. The
    Redis client example raises :class:`RedisError` when a single command's
    reply is an error.

    Attributes:
        message: the text after the ``-``, without the line ending.
    """

    message: str

    @property
    def code(self) -> str:
        """The error's first word (``"ERR"``, ``"WRONGTYPE"``, ``"NOAUTH"`` ...)."""
        return self.message.split(" ", 1)[0]


#: Every value RESP2 can carry; see the table in the module docstring.
RespValue: TypeAlias = int | bytes | str | ErrorReply | list["RespValue"] | None


class Null:
    """The type of :data:`NULL`: a null reply that is not ``None``."""

    _instance: Null | None = None

    def __new__(cls) -> Null:
        # One instance, so `reply is NULL` works like `reply is None`.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NULL"


#: A null bulk string to *send* (``$-1``) where ``None`` means something else,
#: as in a ``triocomm.serve`` handler, for which ``None`` means "no reply".
#: It is received as ``None``.
NULL = Null()


def command(*args: bytes | str | int) -> list[RespValue]:
    """Return the RESP array for one command, each argument as a bulk string.

    ``str`` arguments are encoded as UTF-8 and ``int`` arguments written in
    decimal, which is how Redis expects them::

        command("SET", "counter", 10)   # [b"SET", b"counter", b"10"]

    Raises:
        TypeError: an argument is not bytes, str or int.
    """
    out: list[RespValue] = []
    for arg in args:
        if isinstance(arg, bytes):
            out.append(arg)
        elif isinstance(arg, str):
            out.append(arg.encode())
        elif isinstance(arg, int) and not isinstance(arg, bool):
            out.append(str(arg).encode())
        else:
            raise TypeError(
                f"a command argument must be bytes, str or int, not {type(arg).__name__}"
            )
    return out


@dataclass(frozen=True)
class Resp:
    """The RESP2 codec: encodes and decodes :data:`RespValue` objects.

    Args:
        max_message: the most bytes one top-level value may take on the wire
            (default 64 MiB). A bulk string announcing more than what is left
            raises :class:`~triocomm.FrameTooLarge` before its body arrives.
        max_line: the longest simple string, error or inline command line
            (default 64 KiB).
        max_items: the most values in one top-level value, counting every
            element of every nested array (default 1 Mi). This bounds the
            Python objects a peer can make us build from a few bytes each.
        max_depth: the deepest nesting of arrays (default 32).
        inline: also accept inline commands (a line of words that does not
            start with a RESP type byte, as ``redis-benchmark`` sends for
            ``PING_INLINE``); they decode to a list of ``bytes``. Servers
            only: replies are never inline.

    The same bounds apply when encoding, so an application cannot send what
    its peer, configured alike, would refuse.
    """

    max_message: int = 64 * MiB
    max_line: int = 64 * KiB
    max_items: int = 1024 * 1024
    max_depth: int = 32
    inline: bool = False

    def __post_init__(self) -> None:
        for name in ("max_message", "max_line", "max_items", "max_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def encode(self, message: RespValue | Null) -> bytes:
        """Return the bytes of one value.

        Raises:
            TypeError: ``message`` (or something inside it) is not a
                :data:`RespValue`; ``bool`` and ``float`` are refused rather
                than guessed at.
            ValueError: a simple string or error contains ``\\r`` or ``\\n``,
                an integer does not fit in 64 bits, or arrays nest deeper
                than ``max_depth``.
            FrameTooLarge: the encoded value exceeds ``max_message`` or
                ``max_items``.
        """
        # The common replies (OK, a value) skip the general walk.
        if type(message) is str:
            data = b"+" + _line_text(message, "simple string") + _CRLF
            items = 1
        elif type(message) is bytes:
            data = b"$%d\r\n%s\r\n" % (len(message), message)
            items = 1
        else:
            parts: list[bytes] = []
            items = _encode_into(parts, message, self.max_depth, 0)
            data = b"".join(parts)
        if len(data) > self.max_message:
            raise FrameTooLarge(
                f"cannot send a {len(data)}-byte RESP value: max_message is {self.max_message}",
                size=len(data),
                limit=self.max_message,
            )
        if items > self.max_items:
            raise FrameTooLarge(
                f"cannot send a RESP value of {items} items: max_items is {self.max_items}",
                size=items,
                limit=self.max_items,
            )
        return data

    def decoder(self) -> RespDecoder:
        """Return a fresh decoder, one per connection."""
        return RespDecoder(self)


def _encode_into(parts: list[bytes], value: object, depth_left: int, items: int) -> int:
    """Append the encoding of ``value`` to ``parts``; return the running item count."""
    items += 1
    # bytes first: it is what commands and most replies are made of.
    if isinstance(value, bytes):
        parts += (b"$%d\r\n" % len(value), value, _CRLF)
    elif isinstance(value, (list, tuple)):
        if depth_left == 0:
            raise ValueError("RESP arrays nest deeper than max_depth")
        parts.append(b"*%d\r\n" % len(value))
        for item in value:
            items = _encode_into(parts, item, depth_left - 1, items)
    elif value is None or value is NULL:
        parts.append(b"$-1\r\n")
    elif isinstance(value, bool):
        # bool is an int subclass; True would silently become ":1".
        raise TypeError("RESP has no boolean type in version 2; send 0/1 or b'0'/b'1'")
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"RESP integers are signed 64-bit; {value} does not fit")
        parts.append(b":%d\r\n" % value)
    elif isinstance(value, str):
        parts.append(b"+" + _line_text(value, "simple string") + _CRLF)
    elif isinstance(value, ErrorReply):
        parts.append(b"-" + _line_text(value.message, "error message") + _CRLF)
    elif isinstance(value, (bytearray, memoryview)):
        data = bytes(value)
        parts += (b"$%d\r\n" % len(data), data, _CRLF)
    else:
        raise TypeError(
            f"cannot encode {type(value).__name__} as RESP: use bytes, str, int, None, "
            "NULL, ErrorReply or a list of these"
        )
    return items


def _line_text(text: str, what: str) -> bytes:
    if "\r" in text or "\n" in text:
        raise ValueError(f"a RESP {what} cannot contain CR or LF: {text[:40]!r}")
    return text.encode()


class _OpenArray:
    """An array whose elements are still arriving."""

    __slots__ = ("items", "size")

    def __init__(self, size: int) -> None:
        self.items: list[RespValue] = []
        self.size = size


class RespDecoder:
    """Decoding state of :class:`Resp` for one connection.

    The parser is iterative and resumable: it keeps the arrays still being
    filled on a stack, remembers where it stopped looking for a line end, and
    knows how many bytes a bulk string still needs. Feeding a large value one
    byte at a time therefore costs time linear in its size, and deep nesting
    cannot exhaust the Python stack.
    """

    __slots__ = (
        "_buf",
        "_bulk",
        "_depth",
        "_inline",
        "_items",
        "_max_items",
        "_max_line",
        "_max_message",
        "_scan",
        "_stack",
        "_taken",
    )

    def __init__(self, codec: Resp) -> None:
        self._buf = bytearray()
        self._max_message = codec.max_message
        self._max_line = codec.max_line
        self._max_items = codec.max_items
        self._depth = codec.max_depth
        self._inline = codec.inline
        # Where the next search for CRLF starts (bytes before it hold none).
        self._scan = 0
        # Body length of the bulk string being received, or -1 between values.
        self._bulk = -1
        self._stack: list[_OpenArray] = []
        # Bytes and items already consumed by the unfinished top-level value.
        self._taken = 0
        self._items = 0

    @property
    def buffered(self) -> int:
        """Bytes received toward a value that is not complete yet."""
        return self._taken + len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[RespValue]:
        """Add ``data``; return every top-level value it completes, in order.

        Raises:
            FrameTooLarge: a value exceeds one of the codec's bounds.
            ProtocolError: the bytes are not RESP2.
        """
        buf = self._buf
        buf += data
        have = len(buf)
        out: list[RespValue] = []
        # The state lives in locals while parsing (attribute access costs
        # more than the parsing itself) and is written back at the end.
        stack = self._stack
        scan, bulk, taken, items = self._scan, self._bulk, self._taken, self._items
        max_line, max_message, max_items = self._max_line, self._max_message, self._max_items
        pos = 0
        try:
            while True:
                if bulk >= 0:
                    # The body of a bulk string whose header was read.
                    stop = pos + bulk
                    if have < stop + 2:
                        break
                    if buf[stop] != 13 or buf[stop + 1] != 10:
                        raise ProtocolError(
                            f"RESP bulk string of {bulk} bytes is not followed by CRLF"
                        )
                    value: RespValue = bytes(buf[pos:stop])
                    taken += stop + 2 - pos
                    pos = scan = stop + 2
                    bulk = -1
                else:
                    end = buf.find(_CRLF, scan)
                    if end < 0:
                        # The last byte may be the CR of the CRLF: not counted.
                        if have - pos - 1 > max_line:
                            raise _line_too_long(have - pos - 1, max_line)
                        scan = max(pos, have - 1)
                        break
                    if end - pos > max_line:
                        raise _line_too_long(end - pos, max_line)
                    kind = buf[pos]
                    line_start = pos
                    taken += end + 2 - pos
                    pos = scan = end + 2
                    if kind == 0x24 or kind == 0x2A:  # "$" bulk string or "*" array header
                        digits = buf[line_start + 1 : end]
                        # Plain digits are the common case; _parse_length
                        # handles -1 and says what is wrong with the rest.
                        if digits.isdigit() and len(digits) < _MAX_DIGITS:
                            size = int(digits)
                        else:
                            size = _parse_length(buf, line_start + 1, end, kind)
                        items += 1
                        if items > max_items or (kind == 0x2A and items + size > max_items):
                            raise _too_many_items(items + max(size, 0), max_items)
                        if kind == 0x24:
                            if size >= 0 and size > max_message - taken - 2:
                                raise FrameTooLarge(
                                    f"peer announced a {size}-byte RESP bulk string; "
                                    f"max_message is {max_message}",
                                    size=size,
                                    limit=max_message,
                                )
                            if size >= 0:
                                bulk = size
                                continue
                            value = None
                        elif size == -1:
                            value = None
                        else:
                            if len(stack) >= self._depth:
                                raise ProtocolError(
                                    f"RESP arrays nest deeper than max_depth ({self._depth})"
                                )
                            if size:
                                stack.append(_OpenArray(size))
                                continue
                            value = []
                    else:
                        parsed, count = self._parse_line(buf, line_start, end, not stack)
                        if isinstance(parsed, _More):
                            taken = 0  # a skipped empty inline line
                            continue
                        items += count
                        if items > max_items:
                            raise _too_many_items(items, max_items)
                        value = parsed
                    if taken > max_message:
                        raise FrameTooLarge(
                            f"peer sent a RESP value of at least {taken} bytes; "
                            f"max_message is {max_message}",
                            size=taken,
                            limit=max_message,
                        )
                # One value is complete: put it in its array, closing every
                # array it completes, or hand it out if it is top-level.
                while stack:
                    top = stack[-1]
                    top.items.append(value)
                    if len(top.items) < top.size:
                        break
                    stack.pop()
                    value = top.items
                else:
                    out.append(value)
                    taken = 0
                    items = 0
        finally:
            if pos:
                del buf[:pos]  # bytearray drops its head in O(1)
                scan -= pos
            self._scan, self._bulk, self._taken, self._items = scan, bulk, taken, items
        return out

    def _parse_line(
        self, buf: bytearray, start: int, end: int, top: bool
    ) -> tuple[RespValue | _More, int]:
        """Parse a line that is a whole value: ``(value, items)``, or ``_MORE`` to skip it."""
        if start == end:
            if self._inline and top:
                return _MORE, 0  # an empty inline line is skipped, as Redis does
            raise ProtocolError("empty RESP line: expected a type byte")
        kind = buf[start]
        if kind == 0x3A:  # ":" integer
            number = _parse_int(buf, start + 1, end, "integer")
            if not INT64_MIN <= number <= INT64_MAX:
                raise ProtocolError(f"RESP integer {number} does not fit in 64 bits")
            return number, 1
        if kind == 0x2B:  # "+" simple string
            return _text(buf, start + 1, end, "simple string"), 1
        if kind == 0x2D:  # "-" error
            return ErrorReply(_text(buf, start + 1, end, "error")), 1
        if self._inline and top:
            words = bytes(buf[start:end]).split()
            if not words:
                return _MORE, 0
            return list(words), len(words)
        raise ProtocolError(
            f"unknown RESP type byte {bytes([kind])!r} at the start of "
            f"{bytes(buf[start : min(end, start + 40)])!r}"
        )


def _line_too_long(length: int, limit: int) -> FrameTooLarge:
    return FrameTooLarge(
        f"peer sent a RESP line of at least {length} bytes; max_line is {limit}",
        size=length,
        limit=limit,
    )


def _too_many_items(count: int, limit: int) -> FrameTooLarge:
    return FrameTooLarge(
        f"peer sent a RESP value of at least {count} items; max_items is {limit}",
        size=count,
        limit=limit,
    )


def _parse_length(buf: bytearray, start: int, end: int, kind: int) -> int:
    """The length in a ``$`` or ``*`` header: -1 (null) or more."""
    what = "bulk string length" if kind == 0x24 else "array length"
    size = _parse_int(buf, start, end, what)
    if size < -1:
        raise ProtocolError(f"negative RESP {what} {size}")
    return size


class _More:
    """Marker: the line was a header; the value needs more input."""


_MORE = _More()


def _parse_int(buf: bytearray, start: int, end: int, what: str) -> int:
    digits = bytes(buf[start:end])
    # int() alone would accept " 1", "1_0" and "+1"; RESP allows none of them.
    body = digits[1:] if digits[:1] == b"-" else digits
    if not body or not body.isdigit() or len(digits) > _MAX_DIGITS:
        raise ProtocolError(f"malformed RESP {what}: {digits[:40]!r}")
    return int(digits)


def _text(buf: bytearray, start: int, end: int, what: str) -> str:
    try:
        return bytes(buf[start:end]).decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"RESP {what} is not valid UTF-8: {exc}") from None
