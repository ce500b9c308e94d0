"""Fault class: a connection reset (RST) at every interesting byte offset.

The side that suffers it gets a clear error (``ConnectionLost``), the
connection is never reused, and nothing else is disturbed.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import ConnectionLost, Target, open_client
from triocomm.testing import Fault, fault_client, fault_server

# Offsets into a 4-byte header + 5-byte payload: inside the header, right
# after it, inside the payload.
MID_FRAME = [2, 4, 6]


@pytest.mark.parametrize("after", [0, *MID_FRAME, 9])
async def test_server_survives_a_client_reset(
    after, start_server, invariants, codec, serves
) -> None:
    server = await start_server()
    await invariants.mark()
    async with fault_client(
        Fault.reset(after=after), server.port, codec=codec, requests=[b"hello"]
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1)
    await invariants.check(servers=[server])
    if after in MID_FRAME:
        # The service saw half a request: a lost connection, counted as such.
        assert server.stats.errors["connection_lost"] == 1
    await serves(server)
    await invariants.check(servers=[server])


@pytest.mark.parametrize("after", [0, *MID_FRAME])
async def test_client_reports_a_reset_and_keeps_its_pool_sound(after, invariants, codec) -> None:
    async with fault_server(Fault.reset(after=after), codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client() as client:
            with trio.fail_after(5), pytest.raises(ConnectionLost):
                await client.request(target, b"hello")
            await invariants.check((client, target))
            stats = client.stats(target)
            assert (stats.open, stats.failed) == (0, 1)
        await invariants.check()
