"""Fault class: half-close (EOF on one direction while the other stays open).

A peer that half-closes *between* messages has ended cleanly: what it asked
for before is still answered. One that half-closes *inside* a message has
lost the connection.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import ConnectionLost, Target, open_client
from triocomm.testing import Fault, fault_client, fault_server

REQUEST = b"hello"  # 9 bytes on the wire


async def test_server_answers_everything_sent_before_a_half_close(
    start_server, invariants, codec, serves
) -> None:
    server = await start_server()
    await invariants.mark()
    requests = [b"a", b"bb", b"ccc"]
    after = sum(len(codec.encode(r)) for r in requests)
    async with fault_client(
        Fault.half_close(after=after), server.port, codec=codec, requests=requests
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(messages=3, hangups=1)
    assert peer.received == requests
    await invariants.check(servers=[server])
    assert not server.stats.errors
    await serves(server)


async def test_server_drops_a_half_closed_request(start_server, invariants, codec, serves) -> None:
    server = await start_server()
    await invariants.mark()
    async with fault_client(
        Fault.half_close(after=6), server.port, codec=codec, requests=[REQUEST]
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(hangups=1)
    assert peer.received == []
    await invariants.check(servers=[server])
    assert server.stats.errors["connection_lost"] == 1
    await serves(server)


async def test_server_closes_on_eof_before_any_request(start_server, invariants, codec) -> None:
    server = await start_server()
    await invariants.mark()
    async with fault_client(Fault.half_close(), server.port, codec=codec) as peer:
        with trio.fail_after(5):
            await peer.wait(hangups=1)
    await invariants.check(servers=[server])
    assert not server.stats.errors


@pytest.mark.parametrize("after", [0, 6])  # before the reply, inside it
async def test_client_reports_a_server_that_half_closes(after, invariants, codec) -> None:
    async with fault_server(Fault.half_close(after=after), codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client() as client:
            with trio.fail_after(5), pytest.raises(ConnectionLost):
                await client.request(target, REQUEST)
            await invariants.check((client, target))
        await invariants.check()
