"""Fault class: slowloris — peers that trickle bytes, or read them one at a time.

A trickle keeps every progress-based limit happy, so only the whole-message
limits (``receive``, ``send``) can end it. While such peers hang on, everyone
else is served.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import CommTimeout, ServerTimeouts, Target, Timeouts, open_client
from triocomm.testing import Fault, fault_client, fault_server

CLIENTS = 30
LIMIT = 0.3


async def test_server_cuts_trickling_clients_and_serves_others(
    start_server, invariants, codec, serves
) -> None:
    server = await start_server(timeouts=ServerTimeouts(receive=LIMIT))
    await invariants.mark()
    big = b"x" * 1000  # would take 50 s at one byte per 0.05 s
    async with fault_client(
        Fault.slow_writer(0.05), server.port, codec=codec, requests=[big], connections=CLIENTS
    ) as peer:
        await serves(server)  # while all of them trickle
        with trio.fail_after(5):
            await peer.wait(hangups=CLIENTS)
    await invariants.check(servers=[server])
    assert server.stats.errors["timeout"] == CLIENTS
    assert peer.received == []


async def test_server_cuts_a_client_that_reads_one_byte_per_tick(
    start_server, invariants, codec, serves
) -> None:
    server = await start_server(timeouts=ServerTimeouts(send=LIMIT))
    await invariants.mark()
    # 8 MiB of replies to read at 100 bytes a second: the send limit ends it.
    requests = [b"y" * 60_000] * 140
    async with fault_client(
        Fault.slow_reader(0.01), server.port, codec=codec, requests=requests
    ) as peer:
        await serves(server)
        with trio.fail_after(5):
            await peer.wait(hangups=1)
    assert server.stats.errors["timeout"] == 1
    await invariants.check(servers=[server])


async def test_client_receive_limit_ends_a_trickling_reply(invariants, codec) -> None:
    reply = b"z" * 1000  # 50 s at one byte per 0.05 s
    async with fault_server(Fault.slow_writer(0.05), codec=codec, respond=lambda _: reply) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client(timeouts=Timeouts(receive=LIMIT)) as client:
            with trio.fail_after(5), pytest.raises(CommTimeout) as info:
                await client.request(target, b"hello")
            assert info.value.phase == "receive"
            # The trickling server notices at its next write that we left.
            with trio.fail_after(5):
                await peer.wait(hangups=1)
            await invariants.check((client, target))


async def test_stalled_clients_filling_max_connections_only_delay_a_newcomer(
    start_server, invariants, codec, serves
) -> None:
    server = await start_server(
        max_connections=5, timeouts=ServerTimeouts(first_request=LIMIT, receive=LIMIT)
    )
    await invariants.mark()
    # Every slot taken by a client that connected and never completes a request.
    async with fault_client(
        Fault.stall(after=2), server.port, codec=codec, requests=[b"x"], connections=5
    ) as peer:
        with trio.fail_after(5):
            await peer.wait(faults=5)
            # Accepting pauses at the limit; the limits free the slots, then
            # the newcomer is served.
            await serves(server)
        # Served only once a limit had freed a slot.
        assert server.stats.errors["timeout"] >= 1
        await invariants.check(servers=[server], extra_fds=5, extra_tasks=5)
    assert server.stats.errors["timeout"] == 5
    await invariants.check(servers=[server])
