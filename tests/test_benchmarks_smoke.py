"""Smoke tests of the benchmark suite, so that it cannot rot unnoticed.

Each piece of ``benchmarks/`` runs here for a fraction of a second: every
echo server under the load generator for a few hundred requests, the
byte-for-byte check against a server that answers wrongly, the raw-Trio and
triocomm clients, the idle-connection holder and the report. Nothing is
timed: a benchmark reports, a test only checks that the pieces work.

The load generator runs on uvloop when it is installed and on asyncio's
default loop otherwise; the uvloop server is skipped without uvloop.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The benchmark modules, imported the way ``benchmarks/run.py`` imports them."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        names = ("harness", "servers", "loadgen", "clients", "memory", "backpressure", "run")
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(BENCHMARKS))


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def bench_kinds() -> tuple[str, ...]:
    # Read from servers.py itself, so that a new server is smoke-tested too.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return tuple(importlib.import_module("servers").KINDS)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _kinds() -> list[Any]:
    import triocomm

    params: list[Any] = []
    for kind in bench_kinds():
        marks = []
        if kind == "uvloop-protocol":
            marks.append(pytest.mark.skipif(_loop_name() != "uvloop", reason="needs uvloop"))
        if kind in ("triocomm", "trio-connection"):
            marks.append(
                pytest.mark.skipif(not hasattr(triocomm, "serve"), reason="no triocomm.serve yet")
            )
        params.append(pytest.param(kind, marks=marks))
    return params


@pytest.mark.parametrize("kind", _kinds())
@pytest.mark.parametrize(("conns", "size", "depth"), [(2, 64, 4), (1, 70_000, 1)])
def test_every_server_echoes_under_the_load_generator(
    bench: dict[str, ModuleType], kind: str, conns: int, size: int, depth: int
) -> None:
    harness, loadgen = bench["harness"], bench["loadgen"]
    with harness.ServerProcess(kind, core=None) as server:
        result = loadgen.run_loop(
            loadgen.measure(
                server.port,
                conns=conns,
                size=size,
                depth=depth,
                duration=20.0,
                warmup=0.0,
                requests=200,
            ),
            _loop_name(),
        )
    assert result["requests"] >= 200
    assert result["requests_per_s"] > 0


def test_load_generator_rejects_a_wrong_reply(bench: dict[str, ModuleType]) -> None:
    loadgen = bench["loadgen"]

    async def scenario() -> None:
        finished = asyncio.Event()

        async def corrupting_echo(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            try:
                frame = await reader.readexactly(4 + 64)
                writer.write(frame[:-1] + bytes([frame[-1] ^ 1]))
                await writer.drain()
                await reader.read()
            except ConnectionError:
                pass  # the load generator aborts the connection on a wrong reply
            finally:
                writer.close()
                finished.set()

        server = await asyncio.start_server(corrupting_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(loadgen.BenchmarkError, match="wrong reply bytes"):
                await loadgen.measure(
                    port, conns=1, size=64, depth=1, duration=5.0, warmup=0.0, requests=10
                )
            await asyncio.wait_for(finished.wait(), 5.0)

    asyncio.run(scenario())


async def _raw_trio_server(nursery: trio.Nursery, bench: dict[str, ModuleType]) -> int:
    serve = functools.partial(trio.serve_tcp, bench["servers"].raw_trio_echo, 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    return int(listeners[0].socket.getsockname()[1])


async def test_raw_trio_client_counts_checked_replies(bench: dict[str, ModuleType]) -> None:
    clients = bench["clients"]
    async with trio.open_nursery() as nursery:
        port = await _raw_trio_server(nursery, bench)
        result = await clients.drive(clients.raw_trio_worker(port, 64), 4, 0.2, 0.05)
        nursery.cancel_scope.cancel()
    assert result["requests"] > 0


async def test_triocomm_client_counts_checked_replies(bench: dict[str, ModuleType]) -> None:
    import triocomm

    if not hasattr(triocomm, "open_client"):
        pytest.skip("no triocomm.open_client yet")
    clients = bench["clients"]
    async with trio.open_nursery() as nursery:
        port = await _raw_trio_server(nursery, bench)
        result = await clients.measure(
            "triocomm", port, conns=4, size=64, duration=0.2, warmup=0.05
        )
        nursery.cancel_scope.cancel()
    assert result["requests"] > 0


async def test_client_reports_a_wrong_reply(bench: dict[str, ModuleType]) -> None:
    clients = bench["clients"]

    async def wrong_echo(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(4096)
        await stream.send_all(data[:-1] + bytes([data[-1] ^ 1]))

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, wrong_echo, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(clients.BenchmarkError, match="wrong reply"):
            await clients.drive(clients.raw_trio_worker(port, 64), 1, 5.0, 0.0)
        nursery.cancel_scope.cancel()


def test_memory_holder_opens_and_checks_connections(bench: dict[str, ModuleType]) -> None:
    memory, servers = bench["memory"], bench["servers"]

    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(servers.EchoProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            transports = await memory.hold(port, 40, wait_for_stdin=False)
            for t in transports:
                t.close()
        return len(transports)

    assert asyncio.run(scenario()) == 40


def test_backpressure_measures_a_never_reading_client(bench: dict[str, ModuleType]) -> None:
    # A few pipelined requests with small replies: the pieces work; the
    # figure itself is the benchmark's business.
    result = bench["backpressure"].measure(
        conns=1, requests=20, reply_size=16 * 1024, settle=2.0, core=None
    )
    assert result["connections"] == 1
    assert result["baseline_kib"] > 0
    assert result["loaded_kib"] > 0
    assert result["settle_s"] <= 2.0 + 1.0


def test_report_summarizes_and_formats(bench: dict[str, ModuleType]) -> None:
    run = bench["run"]
    results = {
        "server": {
            "runs": {
                sc: {"triocomm": [90.0, 100.0, 110.0], "raw-trio": [200.0, 210.0, 190.0]}
                for sc in run.SCENARIOS
            }
        },
        "memory": {
            "connections": 10,
            "runs": {"triocomm": [{"bytes_per_connection": 6000.0}]},
        },
        "backpressure": {
            "runs": [
                {
                    "connections": 2,
                    "requests_per_connection": 5000,
                    "reply_bytes": 262144,
                    "bytes_per_connection": 3 * 1024 * 1024,
                }
            ]
        },
    }
    summary = run.summarize(results)
    assert summary["server"]["a"]["ratios"]["triocomm/raw-trio"] == pytest.approx(0.5)
    assert summary["server"]["a"]["kinds"]["triocomm"]["min"] == 90.0
    table = run.format_table(summary, results)
    assert "0.50x*" in table
    assert "6000 B" in table
    assert "3.0 MiB" in table
    markdown = run.format_markdown(summary, results)
    assert "| (a) 1 conn ping-pong 64 B |" in markdown
    assert "**0.50\u00d7**" in markdown
    assert "triocomm 3.0 MiB" in markdown


@pytest.mark.parametrize(
    "workload",
    [
        ["server", "--conns", "3", "--depth", "4", "--requests", "40"],
        ["client", "--conns", "3", "--requests", "40"],
    ],
    ids=["server", "client"],
)
def test_instruction_count_workloads_run(workload: list[str]) -> None:
    # The workload cachegrind counts, run without it (it turns the garbage
    # collector off and seeds Trio, so it runs in a process of its own that
    # imports triocomm as this one does).
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "instructions.py"), *workload, "--inner"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_instruction_count_rejects_a_budget_that_is_not_whole_batches() -> None:
    import subprocess

    command = [sys.executable, str(BENCHMARKS / "instructions.py"), "server", "--depth", "16"]
    done = subprocess.run(
        [*command, "--requests", "100"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "multiple of --depth" in done.stderr
