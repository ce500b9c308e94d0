"""Fault class: stale keep-alive connections.

A pooled connection that the server closed, reset or wrote stray bytes on
while it sat idle is never handed to a session; a reused connection that
dies before any reply byte is retried once on a fresh one. Either way the
caller gets its own reply.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import ServerTimeouts, Target, open_client
from triocomm.testing import Fault, fault_client, fault_server

REPLY = 4 + 5  # bytes of the reply to b"hello"

STALE = {
    "reset": Fault.reset(after=REPLY, pause=0.05),
    "closed": Fault.half_close(after=REPLY, pause=0.05),
    "stray bytes": Fault.garbage(b"\0\0\0\1!", after=REPLY, pause=0.05),
}


@pytest.mark.parametrize("fault", STALE.values(), ids=STALE.keys())
async def test_a_stale_pooled_connection_is_never_reused(fault, invariants, codec) -> None:
    async with fault_server(fault, codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client() as client:
            for round in range(1, 4):
                with trio.fail_after(5):
                    assert await client.request(target, b"hello") == b"hello"
                    await peer.wait(faults=round)  # the pooled connection went bad
                await invariants.check((client, target))
            stats = client.stats(target)
            assert (stats.created, stats.reused, stats.failed) == (3, 0, 0)
        await invariants.check()


async def test_a_reused_connection_that_dies_before_the_reply_is_retried(invariants, codec) -> None:
    # The server reads the second request, then resets instead of answering.
    async with fault_server(Fault.reset(after=REPLY, pause=0.3), codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client(retries=1) as client:
            with trio.fail_after(5):
                assert await client.request(target, b"hello") == b"hello"
                assert await client.request(target, b"again") == b"again"
            assert peer.connections == 2
            # "again" went out on the reused connection, then on a fresh one.
            assert peer.received == [b"hello", b"again", b"again"]
            await invariants.check((client, target))  # once the second one was reset too


async def test_server_closes_an_idle_keepalive_connection(start_server, invariants, codec) -> None:
    server = await start_server(timeouts=ServerTimeouts(keepalive=0.2))
    await invariants.mark()
    async with fault_client(port=server.port, codec=codec, requests=[b"hello"]) as peer:
        with trio.fail_after(5):
            await peer.wait(messages=1, hangups=1)
    await invariants.check(servers=[server])
    assert not server.stats.errors
