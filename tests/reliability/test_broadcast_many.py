"""A broadcast to 1,000 loopback connections, 50 of whose peers never read.

The readers get the message, the sleepers are closed as slow consumers after
the send limit, the call returns the count and nothing outlives the service
(see ``tests/test_broadcast.py`` for the same check on five connections).
"""

from __future__ import annotations

import resource

import pytest
import trio.testing

try:
    from ..test_broadcast import broadcast_to
except ImportError:
    from test_broadcast import broadcast_to  # type: ignore[no-redef]


async def test_broadcast_to_a_thousand_connections_with_some_never_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2100:  # both ends of 1,000 connections live in this process
        pytest.skip(f"needs 2,100 file descriptors, the limit is {soft}")
    await broadcast_to(readers=950, sleepers=50)
