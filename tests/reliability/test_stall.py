"""Fault class: a peer that stops reading and writing but keeps the connection open.

Only time limits can end such a connection; each one must fire, name its
phase, and free everything the connection held.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import ServerTimeouts
from triocomm.testing import Fault, fault_client

LIMIT = 0.2  # real seconds: a real socket is involved


@pytest.mark.parametrize(
    ("after", "timeouts"),
    [
        (0, ServerTimeouts(first_request=LIMIT)),  # connected, never spoke
        (6, ServerTimeouts(receive=LIMIT)),  # stopped inside a request
        (2, ServerTimeouts(inactivity=LIMIT)),  # stopped inside a header
    ],
)
async def test_server_times_out_a_stalled_client(
    after, timeouts, start_server, invariants, codec, serves
) -> None:
    server = await start_server(timeouts=timeouts)
    await invariants.mark()
    async with fault_client(
        Fault.stall(after=after), server.port, codec=codec, requests=[b"hello"]
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1)
        await serves(server)  # while the stalled client still holds its connection
        await invariants.check(servers=[server], extra_fds=1, extra_tasks=1)  # the stalled client
    assert server.stats.errors["timeout"] == 1
    await invariants.check(servers=[server])


async def test_server_ends_an_idle_keepalive_without_calling_it_an_error(
    start_server, invariants, codec
) -> None:
    server = await start_server(timeouts=ServerTimeouts(keepalive=LIMIT))
    await invariants.mark()
    async with fault_client(
        Fault.stall(after=9), server.port, codec=codec, requests=[b"hello"]
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1)
        await invariants.check(servers=[server], extra_fds=1, extra_tasks=1)
    assert not server.stats.errors
