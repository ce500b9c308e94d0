"""Fault class: a frame larger than the codec allows.

It is refused as soon as its header is read (nothing of it is buffered), the
connection is closed, and no other connection notices.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import FrameTooLarge, Target, open_client
from triocomm.testing import Fault, fault_client, fault_server


# First thing; after one good request read on its own (the pause); or after
# one good request that arrives in the same read as the bad frame.
@pytest.mark.parametrize(
    ("after", "pause"), [(0, 0.0), (9, 0.1), (9, 0.0)], ids=["first", "own-read", "same-read"]
)
async def test_server_refuses_an_oversized_frame(
    after, pause, start_server, invariants, codec, serves
) -> None:
    server = await start_server()
    await invariants.mark()
    fault = Fault.oversized(after=after, pause=pause)
    async with fault_client(fault, server.port, codec=codec, requests=[b"hello"]) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=1, hangups=1)
    await invariants.check(servers=[server])
    assert server.stats.errors["frame_too_large"] == 1
    # The good request before the bad frame was still answered.
    assert peer.received == ([b"hello"] if after else [])
    await serves(server)


async def test_client_refuses_an_oversized_reply_and_never_reuses_the_connection(
    invariants, codec
) -> None:
    async with fault_server(Fault.oversized(), codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client() as client:
            for attempt in range(1, 3):
                with trio.fail_after(5), pytest.raises(FrameTooLarge) as info:
                    await client.request(target, b"hello")
                assert (info.value.size, info.value.limit) == (codec.max_frame + 1, codec.max_frame)
                await invariants.check((client, target))
                assert peer.connections == attempt  # a fresh connection each time
