"""Fault class: a frame larger than the codec allows.

It is refused as soon as its header is read (nothing of it is buffered), the
connection is closed, and no other connection notices.
"""

from __future__ import annotations

import pytest
import trio

from triocomm.testing import Fault, fault_client


@pytest.mark.parametrize("after", [0, 9])  # first thing, or after one good request
async def test_server_refuses_an_oversized_frame(
    after, start_server, invariants, codec, serves
) -> None:
    server = await start_server()
    await invariants.mark()
    # The pause lets the good request be read on its own: a request that
    # arrives in the same read as the bad frame is dropped with it.
    fault = Fault.oversized(after=after, pause=0.1 if after else 0.0)
    async with fault_client(fault, server.port, codec=codec, requests=[b"hello"]) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1, hangups=1)
    await invariants.check(servers=[server])
    assert server.stats.errors["frame_too_large"] == 1
    # The good request before the bad frame was still answered.
    assert peer.received == ([b"hello"] if after else [])
    await serves(server)
