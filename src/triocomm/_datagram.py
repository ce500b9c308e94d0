"""Datagrams: the rule "one datagram is one message", shared by both sides.

A datagram carries exactly one message: the codec's encoding of a message
must fit in ``max_datagram`` bytes, and a datagram fed to a fresh decoder
must give exactly one message with nothing left over. The client's UDP
exchange (``_udp.py``) and the datagram service (``_datagram_service.py``)
both go through the two functions here, so they agree byte for byte.
"""

from __future__ import annotations

from typing import Any

from ._errors import ProtocolError
from ._framing import Buffer, Codec

__all__ = ["MAX_DATAGRAM", "check_max_datagram", "decode_datagram", "encode_datagram"]

#: The largest UDP payload over IPv4 (65,535 - 8 bytes of UDP header - 20 of IP).
MAX_DATAGRAM = 65507
# IPv6 allows 20 bytes more (no IP header inside the 65,535); the kernel
# refuses what its address family cannot carry.
_LARGEST = 65527


def check_max_datagram(value: object) -> int:
    """``value`` as a ``max_datagram`` (an int in 1..65527), or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_datagram must be an int, got {value!r}")
    if not 1 <= value <= _LARGEST:
        raise ValueError(f"max_datagram must be in 1..{_LARGEST}, got {value}")
    return value


def encode_datagram(codec: Codec[Any, Any], message: object, max_datagram: int) -> Buffer:
    """The bytes of ``message`` as one datagram.

    Raises:
        ValueError: the encoding is longer than ``max_datagram``.
        TypeError, ...: whatever the codec raises for a message it refuses.
    """
    data = codec.encode(message)
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_datagram:
        raise ValueError(
            f"the message encodes to {size} bytes; a datagram holds at most "
            f"{max_datagram} (max_datagram)"
        )
    return data


def decode_datagram(codec: Codec[Any, Any], data: bytes) -> Any:
    """The one message in the datagram ``data``.

    Raises:
        ProtocolError: the codec rejected the bytes (its own error, e.g.
            :class:`FrameTooLarge`), or they hold no message, several, or a
            message and part of another.
    """
    decoder = codec.decoder()
    messages = decoder.feed(data)
    if len(messages) != 1 or decoder.buffered:
        rest = " and an unfinished one" if decoder.buffered else ""
        raise ProtocolError(
            f"a datagram must hold exactly one message; {len(data)} bytes held "
            f"{len(messages)}{rest}"
        )
    return messages[0]
