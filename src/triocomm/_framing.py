"""Framing: codecs that turn bytes into messages and back (sans-I/O).

Nothing here performs I/O or uses Trio. A :class:`Codec` is an immutable,
hashable description of a wire format; its :meth:`~Codec.decoder` makes the
per-connection state that cuts an incoming byte stream into messages.

Every decoder is bounded: it never holds more than its limit plus the chunk
it was just fed, and it rejects an oversized message as soon as the excess is
known. Decoding cost is linear in the bytes fed: a decoder remembers how far
it has looked, so a large message arriving one byte at a time is not rescanned.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol, TypeVar

from ._errors import FrameTooLarge

__all__ = ["Buffer", "Codec", "Decoder", "LengthPrefixed", "Lines", "Raw"]

#: What codecs accept and return as raw bytes.
Buffer = bytes | bytearray | memoryview

# Invariant: decoders return a (mutable, so invariant) list of messages.
In = TypeVar("In")
Out_contra = TypeVar("Out_contra", contravariant=True)

KiB = 1024
MiB = 1024 * KiB


class Decoder(Protocol[In]):
    """Per-connection decoding state: cuts a byte stream into messages."""

    def feed(self, data: Buffer) -> list[In]:
        """Add ``data`` and return every message it completes, in order.

        Return a new list each time: the caller takes it over (a
        :class:`~triocomm.Connection` keeps the messages it has not handed
        out yet in it, reordered in place).

        Raises:
            FrameTooLarge: a message exceeds the codec's bound.
            ProtocolError: the bytes are not valid for this format.
        """
        ...

    @property
    def buffered(self) -> int:
        """Bytes held toward a message that is not complete yet."""
        ...


class Codec(Protocol[In, Out_contra]):
    """A wire format: how to encode outgoing messages and decode incoming ones.

    ``In`` is the type of the messages received, ``Out_contra`` the type of
    the messages sent. A codec must be immutable and hashable (it is part of a
    :class:`Target`'s identity); per-connection state lives in the object that
    :meth:`decoder` returns.

    Optional fast path: a codec may also define ``encode_batch(messages)``,
    returning the bytes of a whole sequence of messages at once, exactly
    ``b"".join(encode(m) for m in messages)`` and raising what ``encode``
    raises. :meth:`Connection.send_many` (and so a server answering a
    pipelined burst) uses it when present: one call per batch instead of one
    per message. It is not part of this protocol, so a codec without it is
    just as valid. The built-in :class:`LengthPrefixed` and :class:`Raw`
    define it.
    """

    def encode(self, message: Out_contra) -> Buffer:
        """Return the bytes of one message.

        Raises:
            TypeError: ``message`` is not something this codec can encode.
        """
        ...

    def decoder(self) -> Decoder[In]:
        """Return a fresh decoder, one per connection."""
        ...


def _checked_size(codec: str, message: object) -> int:
    """``len(message)`` for the common ``bytes``, else :func:`_require_bytes`."""
    # The exact-type test is the cheap case of the per-message hot path.
    return len(message) if type(message) is bytes else _require_bytes(codec, message)


def _require_bytes(codec: str, message: object) -> int:
    """Return the byte length of ``message`` or raise a clear TypeError."""
    if isinstance(message, (bytes, bytearray)):
        return len(message)
    if isinstance(message, memoryview):
        return message.nbytes
    hint = " (encode text to bytes first)" if isinstance(message, str) else ""
    raise TypeError(
        f"{codec}.encode() takes bytes, bytearray or memoryview, not {type(message).__name__}{hint}"
    )


# -- length-prefixed ---------------------------------------------------------

_HEADER_FORMATS = {
    "!B", "!H", "!I", "!Q", ">B", ">H", ">I", ">Q", "<H", "<I", "<Q", "B",
}  # fmt: skip


@dataclass(frozen=True)
class LengthPrefixed:
    """Payloads behind a fixed-size length header.

    Args:
        header: a :mod:`struct` format for the unsigned length: ``"!B"``,
            ``"!H"``, ``"!I"`` (default, 4 bytes big-endian), ``"!Q"``,
            ``"<H"``, ``"<I"`` or ``"<Q"`` (``">"`` works as ``"!"``).
        max_frame: the largest payload accepted, in bytes (default 16 MiB).
            A header announcing more raises :class:`FrameTooLarge` at once,
            before any of the payload is buffered.

    Messages are :class:`bytes` (any bytes-like object may be sent).
    """

    header: str = "!I"
    max_frame: int = 16 * MiB
    _struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.header not in _HEADER_FORMATS:
            raise ValueError(
                f"unsupported length header {self.header!r}; "
                f"use one of {', '.join(sorted(_HEADER_FORMATS))}"
            )
        if not isinstance(self.max_frame, int) or self.max_frame < 0:
            raise ValueError(f"max_frame must be a non-negative int, got {self.max_frame!r}")
        packer = struct.Struct(self.header)
        capacity = (1 << (8 * packer.size)) - 1
        if self.max_frame > capacity:
            # A larger bound could never be announced by this header.
            object.__setattr__(self, "max_frame", capacity)
        object.__setattr__(self, "_struct", packer)

    def __reduce__(self) -> tuple[type[LengthPrefixed], tuple[str, int]]:
        # The compiled struct does not pickle; the two fields rebuild it
        # (codecs travel to serve_workers' processes).
        return (LengthPrefixed, (self.header, self.max_frame))

    @property
    def header_size(self) -> int:
        """Size of the length header in bytes."""
        return self._struct.size

    def encode(self, message: Buffer) -> bytes:
        """Return the length header followed by ``message``."""
        size = _checked_size("LengthPrefixed", message)
        if size > self.max_frame:
            self._refuse(size)
        return self._struct.pack(size) + message

    def encode_batch(self, messages: Sequence[Buffer]) -> bytes:
        """Return the frames of several messages, back to back, as one ``bytes``.

        The same bytes as joining :meth:`encode` of each, made without an
        intermediate object per frame (headers and payloads are joined once).
        Raises what :meth:`encode` raises, before returning anything.
        """
        pack = self._struct.pack
        max_frame = self.max_frame
        parts: list[Buffer] = []
        append = parts.append
        for message in messages:
            # _checked_size, written out: calling it per message costs 21 ns
            # of this loop's 131 ns per 64-byte message (CPython 3.11).
            size = (
                len(message)
                if type(message) is bytes
                else _require_bytes("LengthPrefixed", message)
            )
            if size > max_frame:
                self._refuse(size)
            append(pack(size))
            append(message)
        return b"".join(parts)

    def _refuse(self, size: int) -> NoReturn:
        raise FrameTooLarge(
            f"cannot send a {size}-byte frame: max_frame is {self.max_frame}",
            size=size,
            limit=self.max_frame,
        )

    def decoder(self) -> LengthPrefixedDecoder:
        """Return a fresh decoder."""
        return LengthPrefixedDecoder(self._struct, self.max_frame)


class LengthPrefixedDecoder:
    """Decoding state of :class:`LengthPrefixed`."""

    __slots__ = ("_buf", "_header", "_max_frame", "_need", "_unpack_from")

    def __init__(self, packer: struct.Struct, max_frame: int) -> None:
        self._buf = bytearray()
        self._unpack_from = packer.unpack_from
        self._header = packer.size
        self._max_frame = max_frame
        # Bytes the buffer must hold before parsing can make progress: this
        # is what keeps byte-at-a-time feeding linear.
        self._need = packer.size

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Buffer) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        if not buf:
            # Fast paths: parse straight from the caller's chunk, buffer only the tail.
            if type(data) is bytes:
                # What a socket read returns: a slice of it is the message,
                # copied once, with no memoryview per message.
                pos = self._parse_bytes(data, out)
                if pos < len(data):
                    buf += data[pos:]
                return out
            with memoryview(data) as view:
                pos = self._parse(view, out)
                if pos < len(view):
                    buf += view[pos:]
            return out
        buf += data
        if len(buf) < self._need:
            return out
        with memoryview(buf) as view:
            pos = self._parse(view, out)
        del buf[:pos]  # bytearray drops its head in O(1)
        return out

    def _parse(self, view: memoryview, out: list[bytes]) -> int:
        pos = 0
        end = len(view)
        header = self._header
        unpack_from = self._unpack_from
        while end - pos >= header:
            (size,) = unpack_from(view, pos)
            if size > self._max_frame:
                self._too_large(size, out)
            stop = pos + header + size
            if stop > end:
                self._need = stop - pos
                return pos
            out.append(bytes(view[pos + header : stop]))
            pos = stop
        self._need = header
        return pos

    def _parse_bytes(self, data: bytes, out: list[bytes]) -> int:
        # _parse for a bytes chunk: the same loop, but slicing bytes already
        # makes the message (half the cost per 64-byte message of a
        # memoryview slice turned into bytes).
        pos = 0
        end = len(data)
        header = self._header
        unpack_from = self._unpack_from
        while end - pos >= header:
            (size,) = unpack_from(data, pos)
            if size > self._max_frame:
                self._too_large(size, out)
            stop = pos + header + size
            if stop > end:
                self._need = stop - pos
                return pos
            out.append(data[pos + header : stop])
            pos = stop
        self._need = header
        return pos

    def _too_large(self, size: int, out: list[bytes]) -> NoReturn:
        error = FrameTooLarge(
            f"peer announced a {size}-byte frame; max_frame is {self._max_frame}",
            size=size,
            limit=self._max_frame,
        )
        error.messages = out  # what arrived whole before the bad header
        raise error


# -- lines -------------------------------------------------------------------


@dataclass(frozen=True)
class Lines:
    """Lines ended by a delimiter.

    Args:
        delimiter: the bytes that end a line (default ``b"\\n"``; use
            ``b"\\r\\n"`` for most text protocols).
        max_line: the longest line accepted, delimiter excluded (default
            64 KiB). A longer line raises :class:`FrameTooLarge` as soon as
            more than ``max_line`` bytes are buffered without a delimiter.

    Received messages are the lines without their delimiter; :meth:`encode`
    appends it.
    """

    delimiter: bytes = b"\n"
    max_line: int = 64 * KiB

    def __post_init__(self) -> None:
        if not isinstance(self.delimiter, bytes) or not self.delimiter:
            raise ValueError(f"delimiter must be non-empty bytes, got {self.delimiter!r}")
        if not isinstance(self.max_line, int) or self.max_line < 0:
            raise ValueError(f"max_line must be a non-negative int, got {self.max_line!r}")

    def encode(self, message: Buffer) -> bytes:
        """Return ``message`` followed by the delimiter.

        Raises:
            TypeError: ``message`` is not bytes-like.
            ValueError: ``message`` contains the delimiter (it would be
                received as two lines).
            FrameTooLarge: ``message`` is longer than ``max_line``.
        """
        size = _require_bytes("Lines", message)
        if size > self.max_line:
            raise FrameTooLarge(
                f"cannot send a {size}-byte line: max_line is {self.max_line}",
                size=size,
                limit=self.max_line,
            )
        delimiter = self.delimiter
        data = b"".join((message, delimiter))
        # The first delimiter must be the appended one. Searching the joined
        # bytes also catches a line that merely *ends* with part of a
        # delimiter that overlaps itself (b"\r\n" before b"\r\n\r\n").
        if data.find(delimiter) != size:
            raise ValueError(
                f"a line cannot contain the delimiter {delimiter!r}"
                " (nor end with a part of it that would join the appended one)"
            )
        return data

    def decoder(self) -> LinesDecoder:
        """Return a fresh decoder."""
        return LinesDecoder(self.delimiter, self.max_line)


class LinesDecoder:
    """Decoding state of :class:`Lines`."""

    __slots__ = ("_buf", "_delimiter", "_max_line", "_scan")

    def __init__(self, delimiter: bytes, max_line: int) -> None:
        self._buf = bytearray()
        self._delimiter = delimiter
        self._max_line = max_line
        # Where the next search for the delimiter starts: bytes before it
        # are known not to begin a delimiter, so they are never rescanned.
        self._scan = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: Buffer) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        delimiter = self._delimiter
        width = len(delimiter)
        max_line = self._max_line
        start = 0
        with memoryview(buf) as view:
            while True:
                end = buf.find(delimiter, self._scan)
                if end < 0:
                    break
                if end - start > max_line:
                    self._too_long(end - start, out)
                out.append(bytes(view[start:end]))
                start = end + width
                self._scan = start
        rest = len(buf) - start
        if rest > max_line:
            self._check_unfinished(buf, rest, out)
        if start:
            del buf[:start]
        self._scan = max(0, len(buf) - width + 1)
        return out

    def _check_unfinished(self, buf: bytearray, rest: int, out: list[bytes]) -> None:
        """Fail if the unfinished line at the end of ``buf`` is already too long.

        Trailing bytes that could be the start of a delimiter do not count
        (yet); every other byte does, so the error comes on the first byte
        that makes the line too long.
        """
        delimiter = self._delimiter
        line = rest
        for k in range(min(len(delimiter) - 1, rest), 0, -1):
            if buf.endswith(delimiter[:k]):
                line = rest - k
                break
        if line > self._max_line:
            self._too_long(line, out)

    def _too_long(self, size: int, out: list[bytes]) -> NoReturn:
        error = FrameTooLarge(
            f"peer sent a line of at least {size} bytes; max_line is {self._max_line}",
            size=size,
            limit=self._max_line,
        )
        error.messages = out  # the lines that ended before the over-long one
        raise error


# -- raw ---------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """No framing: messages are the chunks of bytes as they arrive.

    Args:
        max_chunk: the largest chunk returned at once (default 64 KiB); a
            larger read is split.
    """

    max_chunk: int = 64 * KiB

    def __post_init__(self) -> None:
        if not isinstance(self.max_chunk, int) or self.max_chunk < 1:
            raise ValueError(f"max_chunk must be a positive int, got {self.max_chunk!r}")

    def encode(self, message: Buffer) -> Buffer:
        """Return ``message`` unchanged (it must be bytes-like)."""
        _require_bytes("Raw", message)
        if isinstance(message, memoryview) and message.itemsize != 1:
            # A typed view (e.g. of 4-byte ints): hand on plain bytes, so that
            # every length downstream counts bytes, not items.
            return message.cast("B") if message.c_contiguous else message.tobytes()
        return message

    def encode_batch(self, messages: Sequence[Buffer]) -> bytes:
        """Return the messages joined into one ``bytes`` (each must be bytes-like)."""
        for message in messages:
            _checked_size("Raw", message)
        return b"".join(messages)

    def decoder(self) -> RawDecoder:
        """Return a fresh decoder."""
        return RawDecoder(self.max_chunk)


class RawDecoder:
    """Decoding state of :class:`Raw` (it holds nothing between chunks)."""

    __slots__ = ("_max_chunk",)

    def __init__(self, max_chunk: int) -> None:
        self._max_chunk = max_chunk

    @property
    def buffered(self) -> int:
        return 0

    def feed(self, data: Buffer) -> list[bytes]:
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        step = self._max_chunk
        if size <= step:
            return [bytes(data)] if size else []
        with memoryview(data) as view:
            return [bytes(view[i : i + step]) for i in range(0, size, step)]
