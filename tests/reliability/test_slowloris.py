"""Fault class: slowloris — peers that trickle bytes, or read them one at a time.

A trickle keeps every progress-based limit happy. A service ends it with its
minimum data rates (on by default), or with the whole-message limits
(``receive``, ``send``) where they are set; a large, slow but steady transfer
keeps going. While such peers hang on, everyone else is served.
"""

from __future__ import annotations

import statistics
import struct

import pytest
import trio

import triocomm
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


# -- the minimum data rates, with the default limits (issue 18) ------------------------

TRICKLERS = 200
TRANSFER = 50 * 1024 * 1024
PACE = 1024 * 1024  # bytes a second, both ways
BIG = triocomm.LengthPrefixed(max_frame=TRANSFER)
# A trickler the service has not closed by then has not been cut at all.
GIVE_UP = 30.0


async def _trickle(port: int, lasted: list[float]) -> None:
    """Send a request a byte a second until the service closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    data = struct.pack("!I", 1000) + b"t" * 1000
    async with stream:
        with trio.move_on_after(GIVE_UP):
            try:
                for i in range(len(data)):
                    await stream.send_all(data[i : i + 1])
                    # The service sends nothing: a read that ends is the close.
                    with trio.move_on_after(1.0):
                        await stream.receive_some(1)
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            lasted.append(trio.current_time() - start)


async def _upload(port: int, results: dict[str, float]) -> None:
    """50 MiB in one request, sent at 1 MiB/s; the reply is its size."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = triocomm.Connection(stream, BIG)
    start = trio.current_time()
    async with conn:
        await stream.send_all(struct.pack("!I", TRANSFER))
        chunk = b"u" * (64 * 1024)
        for sent in range(0, TRANSFER, len(chunk)):
            await trio.sleep_until(start + sent / PACE)
            await stream.send_all(chunk)
        assert await conn.receive() == str(TRANSFER).encode()
    results["upload"] = trio.current_time() - start


async def _download(port: int, results: dict[str, float]) -> None:
    """Ask for 50 MiB and read it at 1 MiB/s."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    start = trio.current_time()
    received = 0
    async with stream:
        await stream.send_all(struct.pack("!I", 8) + b"download")
        while received < TRANSFER + 4:
            await trio.sleep_until(start + received / PACE)
            data = await stream.receive_some(64 * 1024)
            assert data, f"the service closed the download after {received} bytes"
            received += len(data)
    assert received == TRANSFER + 4
    results["download"] = trio.current_time() - start


async def test_default_rates_cut_tricklers_and_keep_slow_steady_transfers(
    start_server, invariants, serves
) -> None:
    payload = b"d" * TRANSFER

    async def handler(request: bytes, conn: triocomm.Connection[bytes, bytes]) -> bytes:
        if request == b"download":
            return payload
        return str(len(request)).encode() if len(request) == TRANSFER else request

    server = await start_server(handler, codec=BIG)  # the default ServerTimeouts
    await invariants.mark()
    lasted: list[float] = []
    results: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_upload, server.port, results)
        nursery.start_soon(_download, server.port, results)
        for _ in range(TRICKLERS):
            nursery.start_soon(_trickle, server.port, lasted)
        await serves(server)  # while they all trickle
    grace = ServerTimeouts().rate_grace
    print(
        f"\n{TRICKLERS} tricklers lasted min {min(lasted):.2f} s, median "
        f"{statistics.median(lasted):.2f} s, max {max(lasted):.2f} s (rate_grace {grace} s); "
        f"upload {results['upload']:.1f} s, download {results['download']:.1f} s "
        f"for {TRANSFER >> 20} MiB each at {PACE >> 20} MiB/s"
    )
    # Every trickler was cut by the service, none before its grace ended.
    assert len(lasted) == TRICKLERS
    assert min(lasted) >= grace
    assert max(lasted) < GIVE_UP
    assert set(results) == {"upload", "download"}
    assert server.stats.errors == {"timeout": TRICKLERS}
    await invariants.check(servers=[server])
