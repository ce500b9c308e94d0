"""Test kit for users' own tests: connection pairs and fault injection.

Everything here runs in memory or on loopback; nothing reaches the network.
"""

from __future__ import annotations

from typing import TypeVar

import trio.testing

from ._connection import Connection
from ._framing import Codec

__all__ = ["connection_pair"]

In = TypeVar("In")
Out = TypeVar("Out")


def connection_pair(
    codec: Codec[In, Out], *, lockstep: bool = False
) -> tuple[Connection[In, Out], Connection[In, Out]]:
    """Return two :class:`Connection` objects joined by an in-memory stream pair.

    With ``lockstep=True`` the streams have no buffer at all
    (:func:`trio.testing.lockstep_stream_pair`), so every send waits for the
    peer to receive: use it to test backpressure.
    """
    make = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    left, right = make()
    return Connection(left, codec), Connection(right, codec)
