"""Fault class: a peer that stops reading and writing but keeps the connection open.

Only time limits can end such a connection; each one must fire, name its
phase, and free everything the connection held.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import CommTimeout, LengthPrefixed, ServerTimeouts, Target, Timeouts, open_client
from triocomm.testing import Fault, fault_client, fault_server

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


@pytest.mark.parametrize(
    ("after", "timeouts", "phase"),
    [
        (0, Timeouts(first_response=LIMIT), "first_response"),  # never answers
        (6, Timeouts(receive=LIMIT), "receive"),  # stops inside the reply
        (2, Timeouts(inactivity=LIMIT), "inactivity"),  # stops inside the header
    ],
)
async def test_client_times_out_a_stalled_server(after, timeouts, phase, invariants, codec) -> None:
    async with fault_server(Fault.stall(after=after), codec=codec) as peer:
        target = Target("127.0.0.1", peer.port, codec)
        await invariants.mark()
        async with open_client(timeouts=timeouts) as client:
            with trio.fail_after(5), pytest.raises(CommTimeout) as info:
                await client.request(target, b"hello")
            assert info.value.phase == phase
            assert str(peer.port) in str(info.value)  # the message names the peer
            # The stalled server still holds its end; ours is closed.
            await invariants.check((client, target), extra_fds=1, extra_tasks=1)
            assert client.stats(target).open == 0


async def test_client_send_limit_ends_a_write_to_a_server_that_stopped_reading(
    invariants,
) -> None:
    big = LengthPrefixed(max_frame=64 << 20)
    async with fault_server(Fault.stall(), codec=big) as peer:
        target = Target("127.0.0.1", peer.port, big)
        await invariants.mark()
        async with open_client(timeouts=Timeouts(send=LIMIT)) as client:
            with trio.fail_after(5), pytest.raises(CommTimeout) as info:
                await client.request(target, b"x" * (64 << 20))
            assert info.value.phase == "send"
            await invariants.check((client, target), extra_fds=1, extra_tasks=1)
