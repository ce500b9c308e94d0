"""A netstring codec, written on triocomm's public ``Codec`` / ``Decoder`` protocol.

A netstring frames one message as its length in decimal, a colon, the bytes
and a comma: ``b"5:hello,"``; the empty message is ``b"0:,"``. The format
comes from D. J. Bernstein's note on netstrings.

This file is the complete example of the framing guide (docs/framing.md) and
is tested in tests/test_netstring_example.py. It shows what every codec needs:

* the codec itself is an immutable, hashable value (a frozen dataclass), so it
  can be part of a ``Target``; the per-connection state lives in the decoder;
* the decoder is bounded: it refuses a length larger than ``max_size`` as soon
  as it has read the digits, and a length with too many digits before the
  colon even arrives;
* the decoder's cost is linear in the bytes fed: it keeps what it has learnt
  (the payload length) between calls and never rescans its buffer;
* bad input raises ``ProtocolError`` (or ``FrameTooLarge``), which makes the
  connection close itself.

Run it to see a client and a server exchange netstrings over a memory stream::

    python examples/netstring.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
import trio.testing

import triocomm

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Netstring:
    """Messages framed as ``<length>:<bytes>,``.

    Args:
        max_size: the largest payload accepted, in bytes (default 1 MiB).
    """

    max_size: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {self.max_size}")

    def encode(self, message: Buffer) -> bytes:
        """Return the netstring of ``message``."""
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"Netstring.encode() takes bytes, bytearray or memoryview, "
                f"not {type(message).__name__}"
            )
        size = memoryview(message).nbytes
        if size > self.max_size:
            raise triocomm.FrameTooLarge(
                f"cannot send a {size}-byte netstring: max_size is {self.max_size}",
                size=size,
                limit=self.max_size,
            )
        return b"".join((b"%d:" % size, message, b","))

    def decoder(self) -> NetstringDecoder:
        """Return a fresh decoder: one per connection."""
        return NetstringDecoder(self.max_size)


class NetstringDecoder:
    """The per-connection state that cuts a byte stream into netstrings."""

    def __init__(self, max_size: int) -> None:
        self._buf = bytearray()
        self._max_size = max_size
        # A length with more digits than max_size has is too large, whatever
        # the digits: this bounds how far we look for the colon.
        self._max_digits = len(str(max_size))
        # Once the "<digits>:" header of the current netstring has been read:
        # its payload length and the header's own length. Remembering them
        # means a payload arriving in many pieces is not parsed again each time.
        self._size: int | None = None
        self._header = 0

    @property
    def buffered(self) -> int:
        """Bytes held toward a netstring that is not complete yet."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[bytes]:
        """Add ``data`` and return every netstring it completes, in order."""
        buf = self._buf
        buf += data
        messages: list[bytes] = []
        pos = 0  # where the current netstring starts in buf
        while True:
            if self._size is None and not self._read_header(pos):
                break  # the header is not complete yet
            assert self._size is not None
            start = pos + self._header
            end = start + self._size
            if len(buf) <= end:
                break  # payload or comma still to come
            if buf[end] != ord(","):
                raise triocomm.ProtocolError(
                    f"netstring of {self._size} bytes ends with {bytes(buf[end : end + 1])!r}, "
                    "not b','"
                )
            messages.append(bytes(buf[start:end]))
            pos = end + 1
            self._size = None
        # Drop the finished netstrings (a bytearray removes its head cheaply).
        # The header of an unfinished one stays: `buffered` must not read 0
        # once a message has begun, or a peer closing now would look like a
        # clean end of stream instead of a connection lost mid-message.
        del buf[:pos]
        return messages

    def _read_header(self, pos: int) -> bool:
        """Parse ``<digits>:`` at ``pos``; return False if it is not complete yet."""
        buf = self._buf
        limit = self._max_digits
        colon = buf.find(b":", pos, pos + limit + 1)
        if colon < 0:
            digits = bytes(buf[pos : pos + limit + 1])
            if digits and not digits.isdigit():
                raise triocomm.ProtocolError(f"netstring length must be digits, got {digits!r}")
            if len(digits) > limit:
                # Too many digits for any length we accept: fail before the colon.
                raise triocomm.FrameTooLarge(
                    f"netstring length {digits.decode()}... exceeds max_size {self._max_size}",
                    size=10**limit,
                    limit=self._max_size,
                )
            return False
        digits = bytes(buf[pos:colon])
        if not digits.isdigit() or (digits.startswith(b"0") and digits != b"0"):
            raise triocomm.ProtocolError(f"bad netstring length {digits!r}")
        size = int(digits)
        if size > self._max_size:
            raise triocomm.FrameTooLarge(
                f"peer announced a {size}-byte netstring; max_size is {self._max_size}",
                size=size,
                limit=self._max_size,
            )
        self._size = size
        self._header = colon + 1 - pos
        return True


if TYPE_CHECKING:
    # No base class to inherit: a static type checker confirms that Netstring
    # has what the Codec protocol asks for.
    _codec: triocomm.Codec[bytes, Buffer] = Netstring()


async def main() -> None:
    """Send three netstrings from one end of a memory stream pair to the other."""
    left, right = trio.testing.memory_stream_pair()
    codec = Netstring()
    client = triocomm.Connection(left, codec)
    async with triocomm.Connection(right, codec) as server:
        await client.send_many([b"hello", b"", b"netstrings, with commas,"])
        await client.aclose()
        async for message in server:
            print(message)


if __name__ == "__main__":
    trio.run(main)
