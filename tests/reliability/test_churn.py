"""Fault class: connection churn — tens of thousands of connect / request / close cycles.

With ``keepalive=0`` every request opens a connection and closes it after
the reply. After 20,000 such cycles the process holds exactly the file
descriptors and tasks it held before, the pool is empty and sound, and the
service has no connection left. The rate is printed, not asserted.

The long run uses a Unix socket: 20,000 TCP connections closed by the client
would leave 20,000 ports in TIME_WAIT, and a second run within a minute could
exhaust the ephemeral range. A shorter TCP run covers the TCP path.
"""

from __future__ import annotations

import pytest
import trio

from triocomm import Target, Timeouts, open_client

WORKERS = 8


async def churn(client, target: Target, cycles: int) -> None:
    async def worker(first: int) -> None:
        for i in range(first, cycles, WORKERS):
            message = b"cycle %d" % i
            assert await client.request(target, message) == message

    async with trio.open_nursery() as nursery:
        for first in range(WORKERS):
            nursery.start_soon(worker, first)


@pytest.mark.timeout(180)  # 20 s alone; allow for a machine busy with other runs
@pytest.mark.parametrize(("transport", "cycles"), [("unix", 20_000), ("tcp", 2_000)])
async def test_churn(transport, cycles, start_server, invariants, codec, short_tmp, capsys) -> None:
    if transport == "unix":
        path = f"{short_tmp}/churn.sock"
        server = await start_server(path=path)
        target = Target.unix(path, codec)
    else:
        server = await start_server()
        target = Target("127.0.0.1", server.port, codec)
    await invariants.mark()
    async with open_client(timeouts=Timeouts(keepalive=0)) as client:
        start = trio.current_time()
        with trio.fail_after(120):
            await churn(client, target, cycles)
        elapsed = trio.current_time() - start
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.failed) == (cycles, 0, 0)
        await invariants.check((client, target), servers=[server])
        assert stats.open == 0
    await invariants.check(servers=[server])
    assert server.stats.connections_total == cycles
    assert not server.stats.errors
    with capsys.disabled():
        print(
            f"\n[churn] {cycles} connect/request/close cycles over {transport}: "
            f"{elapsed:.1f} s, {cycles / elapsed:,.0f} cycles/s"
        )
