"""The ``triocomm`` command line.

Argument parsing, the latency histogram and the report are tested in process
(no sockets). The commands themselves run as subprocesses, exactly as a user
runs them: ``serve`` plus ``bench`` against it, the embedded ``bench``, bad
arguments, an unreachable address, and shutdown on SIGINT / SIGTERM. Every
subprocess is bounded in time and killed if a test leaves it running.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import functools
import importlib
import io
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given
from hypothesis import strategies as st

import triocomm
from triocomm import _cli
from triocomm._cli import _histogram, _load, _progress, _report, _serve
from triocomm._cli._arguments import (
    TcpAddress,
    UnixAddress,
    parse_address,
    parse_duration,
    parse_size,
)
from triocomm._cli._histogram import LatencyHistogram
from triocomm._cli._report import BenchResult, BenchSettings
from triocomm.testing import connection_pair

# -- the package's shape -----------------------------------------------------------

CLI_SOURCES = sorted((Path(_cli.__file__).parent).glob("*.py"))


def test_the_command_line_uses_only_triocomms_public_api() -> None:
    # Its own modules with one dot; triocomm only as `from .. import NAME` (the
    # public names) or its public integrations (`from ..contrib.prometheus`),
    # never a private module (`from .._connection import ...`).
    for path in CLI_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                public = node.module is None or node.module.startswith("contrib.")
                assert public, f"{path.name} imports from ..{node.module}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not str(node.module).startswith("triocomm"), path.name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("triocomm") for a in node.names), path.name


def test_every_cli_module_has_a_docstring_and_short_functions() -> None:
    for path in CLI_SOURCES:
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no module docstring"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                assert length <= 80, f"{path.name}: {node.name} is {length} lines"


def test_the_script_entry_point_is_the_packages_main() -> None:
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    match = re.search(r'^triocomm = "([\w.]+):(\w+)"$', pyproject, re.MULTILINE)
    assert match is not None
    module = importlib.import_module(match.group(1))
    assert getattr(module, match.group(2)) is _cli.main


# -- argument values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", TcpAddress("127.0.0.1", 7000)),
        ("localhost:1", TcpAddress("localhost", 1)),
        ("[::1]:65535", TcpAddress("::1", 65535)),
        ("[fe80::1%eth0]:80", TcpAddress("fe80::1%eth0", 80)),
        ("/run/echo.sock", UnixAddress("/run/echo.sock")),
        ("./echo.sock", UnixAddress("./echo.sock")),
    ],
)
def test_parse_address_accepts(text: str, expected: object) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("localhost", "HOST:PORT"),
        (":7000", "HOST:PORT"),
        ("::1:7000", "brackets"),
        ("[::1]7000", "HOST:PORT"),
        ("[::1]:", "port"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:http", "port"),
    ],
)
def test_parse_address_rejects_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        parse_address(text)


def test_tcp_address_prints_as_typed() -> None:
    assert str(TcpAddress("::1", 80)) == "[::1]:80"
    assert str(TcpAddress("127.0.0.1", 80)) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64", 64),
        ("64B", 64),
        ("1k", 1024),
        ("1K", 1024),
        ("4KiB", 4096),
        ("4kb", 4096),
        ("1M", 1024**2),
        ("16MiB", 16 * 1024**2),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "1.5k", "1x", "", "17M", "1G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"), [("3", 3.0), ("2.5s", 2.5), ("500ms", 0.5), ("1m", 60.0), (".5", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "-1", "abc", "1h", "inf", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


# -- bad arguments, in process ---------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["serve", "--port", "x"], "port must be a number"),
        (["serve", "--port", "1", "--unix", "/tmp/x"], "not allowed with argument"),
        (["serve", "--codec", "json"], "invalid choice: 'json'"),
        (["serve", "--tls-cert", __file__], "--tls-cert and --tls-key go together"),
        (["serve", "--tls-cert", "/nonexistent/cert.pem"], "cannot read"),
        (["serve", "--unix", "/tmp/x", "--host", "::1"], "--host does not apply"),
        (["bench", "nohost"], "bad address 'nohost'"),
        (["bench", "--conns", "0"], "conns must be a whole number between 1"),
        (["bench", "--pipeline", "two"], "pipeline must be a whole number"),
        (["bench", "--size", "lots"], "bad size 'lots'"),
        (["bench", "--codec", "lines", "--size", "65537"], "larger than the lines codec"),
        (["bench", "--duration", "1", "--requests", "5"], "not allowed with argument"),
        (["bench", "--requests", "0"], "requests must be a whole number at least 1"),
        (["bench", "--tls-ca", __file__], "--tls-ca needs a TCP ADDRESS"),
        (["bench", "1.2.3.4:5", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_give_usage_and_one_error_line(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: triocomm")
    assert error in lines[-1]
    assert lines[-1].startswith("triocomm")
    assert ": error: " in lines[-1]
    # The usage may wrap over several lines; nothing but it and the error.
    assert all(line.startswith(" ") for line in lines[1:-1])


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    for command, options in [
        ("serve", ["--host", "--port", "--unix", "--codec", "--tls-cert", "--tls-key", "-v"]),
        (
            "bench",
            ["ADDRESS", "--codec", "--conns", "--size", "--pipeline", "--duration", "--requests"],
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            _cli.main([command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in [*options, "--json"] if command == "bench" else options:
            assert option in text, (command, option)
    with pytest.raises(SystemExit):
        _cli.main(["serve", "--help"])
    serve_help = " ".join(capsys.readouterr().out.split())
    assert "default 127.0.0.1" in serve_help
    assert "default 7000" in serve_help


# -- latency histogram -----------------------------------------------------------


def test_histogram_buckets_are_contiguous_and_narrow() -> None:
    previous_high = -1
    for index in range(LatencyHistogram._index(1 << 30)):
        low, high = LatencyHistogram.bucket_range(index)
        assert low == previous_high + 1
        assert LatencyHistogram._index(low) == index
        assert LatencyHistogram._index(high) == index
        # At most 1/32 of the value wide: the promised precision.
        assert high - low <= max(low, 1) / 32
        previous_high = high


def test_histogram_memory_is_bounded() -> None:
    hist = LatencyHistogram()
    size = len(hist._counts)
    for value in (0, 1, 1e3, 1e6, 1e9, 1e15, 1e30):
        hist.record(value)
    assert len(hist._counts) == size < 1300
    assert hist.max == 1e30
    assert hist.percentile(1.0) == 1e30


def test_empty_histogram() -> None:
    hist = LatencyHistogram()
    assert (hist.count, hist.min, hist.max, hist.mean, hist.percentile(0.5)) == (0, 0, 0, 0, 0)
    assert _histogram.histogram_rows(hist) == []
    assert _histogram.render_histogram(hist) == []


@given(st.lists(st.floats(min_value=0, max_value=1e8), min_size=1, max_size=300))
def test_percentiles_are_within_the_bucket_precision(values: list[float]) -> None:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    ordered = sorted(values)
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        exact = ordered[max(1, math.ceil(q * len(ordered))) - 1]
        # Bucketing floors to whole microseconds, then a bucket spans 1/32.
        assert abs(hist.percentile(q) - exact) <= exact / 32 + 1, q
    assert hist.min == ordered[0]
    assert hist.max == ordered[-1]
    assert hist.count == len(values)
    assert hist.mean == pytest.approx(sum(values) / len(values))


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        LatencyHistogram().percentile(1.5)


@given(st.lists(st.floats(min_value=0, max_value=1e7), min_size=1, max_size=200))
def test_histogram_rows_cover_every_request_in_order(values: list[float]) -> None:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    rows = _histogram.histogram_rows(hist)
    assert 1 <= len(rows) <= 12
    assert sum(count for _, _, count in rows) == len(values)
    assert rows[0][0] == hist.min
    assert rows[-1][1] == hist.max
    assert all(a <= b for a, b, _ in rows)
    assert all(rows[k][1] == pytest.approx(rows[k + 1][0]) for k in range(len(rows) - 1))


def _result(latencies: list[float], errors: Counter[str] | None = None) -> BenchResult:
    hist = LatencyHistogram()
    for value in latencies:
        hist.record(value)
    settings = BenchSettings("127.0.0.1:7000", True, "length", 8, 64, 1, 3.0, None)
    return BenchResult(settings, len(latencies), 2.0, hist, errors or Counter())


def test_report_text_and_histogram() -> None:
    latencies = [50.0] * 90 + [400.0] * 9 + [5000.0]
    text = _report.render_report(_result(latencies), width=80)
    assert "100 in 2.00 s = 50 req/s" in text
    assert "errors     0 (every reply checked)" in text
    assert "p50 50 µs" in text
    assert "max 5.00 ms" in text
    bars = [line for line in text.splitlines() if "│" in line or "|" in line]
    assert len(bars) == 12
    assert all(len(line) <= 80 for line in bars)
    # The tallest bar is the 90 % row, and every request is in some row.
    counts = [int(line.split()[-2]) for line in bars]
    assert max(counts) == 90
    assert sum(counts) == 100
    assert "█" in bars[0]
    plain = _report.render_report(_result(latencies), unicode=False)
    assert "µ" not in plain
    assert "█" not in plain
    assert "#" in plain


def test_report_lists_errors_by_kind() -> None:
    errors = Counter({"ConnectionLost": 3, "timeout (first_response)": 1})
    text = _report.render_report(_result([10.0], errors))
    assert "errors     4 (ConnectionLost 3, timeout (first_response) 1)" in text
    assert not _result([10.0], errors).ok


def test_report_json_has_the_documented_fields() -> None:
    data = _report.report_json(_result([50.0] * 99 + [1000.0], Counter({"EchoMismatch": 2})))
    json.dumps(data)  # serialisable
    assert data["requests"] == 100
    assert data["requests_per_s"] == 50.0
    assert data["errors"] == 2
    assert data["errors_by_kind"] == {"EchoMismatch": 2}
    latency = data["latency_us"]
    assert set(latency) >= {"p50", "p90", "p99", "max"}
    assert latency["p50"] == pytest.approx(50, abs=1)
    assert latency["max"] == 1000.0
    assert sum(row["count"] for row in data["histogram"]) == 100


# -- pieces of the load generator, without sockets ---------------------------------


def test_payloads_are_distinct_sized_and_newline_free() -> None:
    for size in (1, 5, 64, 1000):
        make = _load.payload_maker(size)
        payloads = {make(worker, serial) for worker in range(3) for serial in range(50)}
        assert all(len(p) == size for p in payloads)
        assert not any(b"\n" in p or b"\r" in p for p in payloads)
        if size >= 64:
            assert len(payloads) == 150


def test_run_budget_hands_out_exactly_n_requests() -> None:
    run = _load.LoadRun(10, clock=lambda: 0.0)
    assert [run.claim(4) for _ in range(4)] == [4, 4, 2, 0]
    unlimited = _load.LoadRun(None, clock=lambda: 0.0)
    assert unlimited.claim(7) == 7
    unlimited.stopping = True
    assert unlimited.claim(7) == 0


def test_run_counts_latency_errors_and_elapsed() -> None:
    now = [10.0]
    run = _load.LoadRun(None, clock=lambda: now[0])
    now[0] = 10.25
    run.answered(10.0)
    assert run.done == 1
    assert run.latency.max == pytest.approx(250_000)
    assert run.elapsed == pytest.approx(0.25)  # still running: up to now
    now[0] = 11.0
    run.finished_at = 10.5
    assert run.elapsed == pytest.approx(0.5)
    run.failed(triocomm.CommTimeout("first_response", 10, "x"), 3)
    run.failed(trio.EndOfChannel(), 1)
    assert run.errors == {"timeout (first_response)": 3, "closed by peer": 1}
    assert run.error_count == 4


def _refused() -> triocomm.ConnectError:
    error = triocomm.ConnectError("cannot connect", address=("127.0.0.1", 9))
    error.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    return error


def test_failed_connects_are_counted_apart_and_end_the_measured_time() -> None:
    now = [0.0]
    run = _load.LoadRun(None, clock=lambda: now[0])
    now[0] = 1.0
    run.answered(0.5)
    now[0] = 1.5
    run.failed(_refused(), 4)  # a batch of 4 whose connect failed: no request sent
    assert (run.error_count, run.connect_errors) == (0, {"Connection refused": 1})
    assert run.measured == pytest.approx(1.0)  # up to the last reply
    now[0] = 2.0
    run.answered(1.8)  # the service answers again: the gap was part of the run
    now[0] = 3.0
    run.finish()
    assert run.measured == run.elapsed == pytest.approx(3.0)
    now[0] = 4.0
    run.failed(_refused(), 1)
    assert run.measured == pytest.approx(2.0)
    assert run.connect_error_count == 2


def test_report_shows_failed_connects_apart_from_req_s() -> None:
    result = _result([10.0] * 100)
    result.connect_errors = Counter({"Connection refused": 38})
    result.measured = 0.5
    assert result.requests_per_s == 200.0  # 100 requests in 0.5 s, not in the 2 s run
    assert not result.ok
    text = _report.render_report(result)
    assert "requests   100 in 0.50 s = 200 req/s" in text
    assert "errors     0 (every reply checked)" in text
    expected = (
        "  connects   38 failed (Connection refused 38); "
        "req/s leaves out the 1.50 s after the last reply"
    )
    assert expected in text.splitlines()
    data = _report.report_json(result)
    assert (data["elapsed_s"], data["measured_s"], data["requests_per_s"]) == (2.0, 0.5, 200.0)
    assert (data["errors"], data["connect_errors"]) == (0, 38)
    assert data["connect_errors_by_cause"] == {"Connection refused": 38}


def test_progress_shows_failed_connects_once_there_are_some() -> None:
    plain = _progress.ProgressDisplay(sys.stderr, live=False, duration=3.0, requests=None)
    assert plain.line(2.0, 10, 0, 0.0, 3) == (
        "triocomm bench: 2.0 s  0 req/s  0 errors  3 failed connects  10 requests"
    )


async def test_requests_unanswered_when_the_end_grace_runs_out_are_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def stalled(payloads: list[bytes], answered: Any) -> None:
        answered(trio.current_time())  # the first reply of the batch came back
        await trio.sleep_forever()

    run = _load.LoadRun(None)
    with trio.move_on_after(5):
        await _load.worker(0, run, stalled, 4, 64)
    assert run.done == 1
    assert run.errors == {"unanswered at the end": 3}


def test_progress_lines() -> None:
    plain = _progress.ProgressDisplay(sys.stderr, live=False, duration=3.0, requests=None)
    assert plain.interval == 1.0
    assert plain.line(1.0, 1234, 2, 1234.4) == (
        "triocomm bench: 1.0 s  1,234 req/s  2 errors  1,234 requests"
    )
    live = _progress.ProgressDisplay(sys.stderr, live=True, duration=None, requests=100)
    text = live.line(0.5, 50, 0, 100.0)
    assert "[██████████░░░░░░░░░░]" in text
    assert "50/100 requests" in text


def test_live_progress_rewrites_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    live = _progress.ProgressDisplay(
        sys.stderr, live=True, duration=2.0, requests=None, unicode=False
    )
    live.show(1.0, 10, 0, 10.0)
    live.show(2.0, 20, 0, 10.0)
    live.close()
    err = capsys.readouterr().err
    assert "\n" not in err
    assert err.count("\r") == 3
    assert err.endswith("\r\x1b[K")
    assert "[##########----------]" in err


class _ChunkedEcho:
    """A stand-in for the client: ``run()`` hands the session one end of a memory
    pair whose other end echoes the bytes back cut into odd-sized chunks (or
    altered), which is what a raw-codec echo over TCP may do."""

    def __init__(self, nursery: trio.Nursery, *, corrupt_at: int | None = None) -> None:
        self.nursery = nursery
        self.corrupt_at = corrupt_at

    async def run(
        self, target: object, session_fn: Any, *args: Any, timeouts: object = None
    ) -> Any:
        ours, theirs = connection_pair(triocomm.Raw())
        self.nursery.start_soon(self._echo, theirs)
        async with ours:
            return await session_fn(ours, *args)

    async def _echo(self, conn: triocomm.Connection[bytes, bytes]) -> None:
        offset = 0
        # The client hangs up when it sees damage: that ends the echo too.
        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
            async with conn:
                async for chunk in conn:
                    for start in range(0, len(chunk), 7):
                        piece = bytearray(chunk[start : start + 7])
                        if self.corrupt_at is not None and 0 <= self.corrupt_at - offset < 7:
                            piece[self.corrupt_at - offset] ^= 1
                        offset += len(piece)
                        await conn.send(bytes(piece))


async def test_raw_session_reassembles_chunks_and_counts_each_request() -> None:
    make = _load.payload_maker(64)
    payloads = [make(0, serial) for serial in range(3)]
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        session = _load.make_session(_ChunkedEcho(nursery), None, framed=False, depth=3)
        with trio.fail_after(5):
            await session(payloads, times.append)
        assert len(times) == 3
        corrupt = _load.make_session(
            _ChunkedEcho(nursery, corrupt_at=100), None, framed=False, depth=3
        )
        answered: list[float] = []
        with pytest.raises(_load.EchoMismatch, match="differ"):
            await corrupt(payloads, answered.append)
        # The first request (bytes 0-63) was echoed intact before the damage.
        assert len(answered) == 1


# -- the command line as a subprocess ------------------------------------------------

CLI = [sys.executable, "-m", "triocomm"]
# Generous: the machine is shared; these bound a hang, they time nothing.
STARTUP = 30
RUN = 60


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"COLUMNS": "80", "PYTHONIOENCODING": "utf-8"})
    return env


async def run_cli(*args: str, timeout: float = RUN) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m triocomm ARGS`` to completion (killed if it outlives ``timeout``)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False, env=_env()
        )


class Output:
    """Everything a subprocess wrote on one pipe so far, and a way to wait for more."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = False
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while chunk := await stream.receive_some():
                self.data += chunk
                self._changed.set()
                self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    async def wait_for(self, pattern: str) -> re.Match[str]:
        while (match := re.search(pattern, self.text)) is None:
            if self.ended:
                raise AssertionError(f"output ended without {pattern!r}: {self.text!r}")
            await self._changed.wait()
        return match

    @property
    def text(self) -> str:
        return self.data.decode()


@dataclass
class Served:
    process: trio.Process
    out: Output
    err: Output
    address: str

    async def stop(self, signum: int = signal.SIGINT) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(STARTUP):
            return await self.process.wait()


@asynccontextmanager
async def serving(*args: str) -> AsyncIterator[Served]:
    """Run ``triocomm serve ARGS`` until the block ends; yield it once it listens."""
    process = await trio.lowlevel.open_process(
        [*CLI, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    out, err = Output(), Output()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(out.pump, process.stdout)
            nursery.start_soon(err.pump, process.stderr)
            with trio.fail_after(STARTUP):
                match = await out.wait_for(r"listening on (\S+)\n")
            yield Served(process, out, err, match.group(1))
            if process.returncode is None:
                process.kill()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def _no_traceback(result: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    assert b"Traceback" not in result.stdout


async def test_python_m_triocomm_help() -> None:
    result = await run_cli("--help")
    assert result.returncode == 0
    assert b"usage: triocomm" in result.stdout
    assert b"serve" in result.stdout
    assert b"bench" in result.stdout


async def test_bad_arguments_exit_2_with_usage_and_one_error_line() -> None:
    result = await run_cli("bench", "--conns", "0")
    assert result.returncode == 2
    _no_traceback(result)
    lines = result.stderr.decode().strip().splitlines()
    assert lines[0].startswith("usage: triocomm bench")
    why = "conns must be a whole number between 1 and 10000, got '0'"
    assert lines[-1] == f"triocomm bench: error: argument --conns: {why}"
    assert result.stdout == b""


def _closed_port() -> int:
    # A port that was free a moment ago: nothing listens on it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_unreachable_address_is_one_clear_line_and_status_1(tmp_path: Path) -> None:
    port = _closed_port()
    result = await run_cli("bench", f"127.0.0.1:{port}", "--requests", "10")
    assert result.returncode == 1
    _no_traceback(result)
    lines = result.stderr.decode().strip().splitlines()
    assert lines == [f"triocomm bench: cannot connect to 127.0.0.1:{port}: Connection refused"]
    assert result.stdout == b""
    missing = tmp_path / "nobody.sock"
    result = await run_cli("bench", str(missing), "--requests", "10")
    assert result.returncode == 1
    _no_traceback(result)
    assert result.stderr.decode().strip().splitlines() == [
        f"triocomm bench: cannot connect to {missing}: No such file or directory"
    ]


async def test_serve_on_a_busy_port_is_one_clear_line_and_status_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await run_cli("serve", "--port", str(port))
    assert result.returncode == 1
    _no_traceback(result)
    assert result.stderr.decode().strip().splitlines() == [
        f"triocomm serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("codec", "where", "pipeline", "signum"),
    [
        ("length", "tcp", 1, signal.SIGINT),
        ("lines", "unix", 4, signal.SIGTERM),
        ("raw", "tcp", 3, signal.SIGINT),
        ("length", "tcp6", 8, signal.SIGTERM),
    ],
)
async def test_serve_then_bench_against_it_then_signal(
    codec: str, where: str, pipeline: int, signum: int, tmp_path: Path
) -> None:
    if where == "tcp6" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    place = {
        "tcp": ["--port", "0"],
        "tcp6": ["--host", "::1", "--port", "0"],
        "unix": ["--unix", str(tmp_path / "echo.sock")],
    }[where]
    async with serving("--codec", codec, *place) as served:
        assert served.out.text.startswith(f"triocomm: echo service ({codec}) listening on ")
        if where == "tcp6":
            assert served.address.startswith("[::1]:")
        requests = 203  # not a multiple of the pipeline depth or the connections
        result = await run_cli(
            "bench", served.address, "--codec", codec, "--conns", "3",
            "--pipeline", str(pipeline), "--size", "100", "--requests", str(requests), "--json",
        )  # fmt: skip
        _no_traceback(result)
        assert result.returncode == 0, result.stderr.decode()
        report = json.loads(result.stdout)
        assert report["requests"] == requests
        assert report["errors"] == 0
        assert report["errors_by_kind"] == {}
        assert report["requests_per_s"] > 0
        latency = report["latency_us"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
        assert report["settings"]["pipeline"] == pipeline
        status = await served.stop(signum)
        assert status == 0
        await served.out.wait_for("stopped")
    name = signal.Signals(signum).name
    assert f"triocomm: {name} received, shutting down" in served.out.text
    assert "triocomm: echo service stopped" in served.out.text
    assert "Traceback" not in served.err.text


async def test_sigint_stops_serve_promptly_with_an_idle_client_connected() -> None:
    async with serving("--port", "0", "--grace", "20") as served:
        host, _, port = served.address.rpartition(":")
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            conn = triocomm.Connection(stream, triocomm.LengthPrefixed())
            await conn.send(b"ping")
            assert await conn.receive() == b"ping"
            # The connection is now idle in keep-alive: shutdown closes it
            # at once instead of waiting out the 20 s grace.
            with trio.fail_after(10):
                assert await served.stop(signal.SIGINT) == 0
            with trio.fail_after(5), pytest.raises((trio.EndOfChannel, triocomm.ConnectionLost)):
                await conn.receive()
    assert "echo service stopped (1 connections, 1 requests served)" in served.out.text


def _connection_events_level(caplog: pytest.LogCaptureFixture) -> int:
    """The level at which the core logs a connection's open."""
    caplog.set_level(logging.DEBUG, logger="triocomm.connection")
    connection_pair(triocomm.LengthPrefixed())
    levels = [r.levelno for r in caplog.records if r.getMessage().endswith(" opened")]
    caplog.clear()
    return levels[0]


async def test_verbose_serve_logs_connection_opens_and_closes_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if _connection_events_level(caplog) < logging.INFO:
        pytest.skip("this core logs connection events at DEBUG: -v shows them once they are INFO")
    async with serving("--port", "0", "-v") as served:
        host, _, port = served.address.rpartition(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            conn = triocomm.Connection(stream, triocomm.LengthPrefixed())
            await conn.send(b"hello")
            assert await conn.receive() == b"hello"
            client_port = stream.socket.getsockname()[1]
        peer = f"127.0.0.1:{client_port}"
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
        with trio.fail_after(STARTUP):
            await served.err.wait_for(
                rf"{stamp} INFO    triocomm\.connection: connection #\d+ with {peer} opened\n"
            )
            await served.err.wait_for(
                rf"{stamp} INFO    triocomm\.connection: connection #\d+ with {peer} "
                r"closed .*1 messages in, 1 out"
            )
        assert await served.stop() == 0


@pytest.mark.parametrize(("verbosity", "shown"), [(1, ["INFO"]), (2, ["DEBUG", "INFO"])])
def test_verbose_logging_shows_info_and_vv_debug_in_a_clean_format(
    verbosity: int, shown: list[str]
) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("triocomm")
    level = logger.level
    # Twice, as main() called twice in one process would: one handler only.
    _serve.configure_logging(verbosity, stream)
    handler = _serve.configure_logging(verbosity, stream)
    try:
        connection_logger = logging.getLogger("triocomm.connection")
        connection_logger.debug("connection #1 with 127.0.0.1:5 opened")
        connection_logger.info("connection #2 with 127.0.0.1:6 opened")
    finally:
        logger.removeHandler(handler)  # type: ignore[arg-type]
        logger.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == shown
    for line in lines:
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO) +"
            r"triocomm\.connection: connection #\d with 127\.0\.0\.1:\d opened",
            line,
        ), line


def test_no_verbose_flag_configures_no_logging() -> None:
    assert _serve.configure_logging(0) is None


async def test_connections_log_open_and_close_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="triocomm.connection")
    left, right = connection_pair(triocomm.LengthPrefixed())
    await left.send(b"x")
    assert await right.receive() == b"x"
    await left.aclose()
    await right.abort()
    await left.aclose()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == f"connection #{left.id} with memory stream opened"
    assert lines[1] == f"connection #{right.id} with memory stream opened"
    assert lines[2].startswith(f"connection #{left.id} with memory stream closed (CLOSED): ")
    assert "0 messages in, 1 out" in lines[2]
    assert lines[3].startswith(f"connection #{right.id} with memory stream closed (ERROR): ")
    assert len(lines) == 4  # closing twice logs once


async def test_serve_and_bench_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = (tmp_path / n for n in ("cert.pem", "key.pem", "ca.pem"))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    async with serving(
        "--port", "0", "--tls-cert", str(cert_file), "--tls-key", str(key_file)
    ) as served:
        assert "(length, TLS)" in served.out.text
        result = await run_cli(
            "bench", served.address, "--tls-ca", str(ca_file), "--requests", "50", "--json"
        )
        assert result.returncode == 0, result.stderr.decode()
        report = json.loads(result.stdout)
        assert (report["requests"], report["errors"]) == (50, 0)
        assert report["settings"]["tls"] is True
        assert await served.stop() == 0


@pytest.mark.parametrize("codec", ["lines", "raw"])
async def test_bench_with_the_wrong_codec_says_so_in_one_line(codec: str) -> None:
    async with serving("--port", "0", "--codec", "length") as served:
        # A line's (or raw chunk's) first four bytes read as a huge length:
        # the service drops the connection, and bench says what that means.
        result = await run_cli("bench", served.address, "--codec", codec, "--requests", "10")
        assert result.returncode == 1
        _no_traceback(result)
        assert result.stdout == b""
        assert result.stderr.decode().splitlines() == [
            f"triocomm bench: {served.address} closed the connection without echoing the first "
            f"request: is it an echo service using the {codec} codec? (check --codec)"
        ]
        assert await served.stop() == 0


async def test_bench_against_a_peer_that_closes_at_once_says_so_in_one_line() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        result = await run_cli("bench", f"127.0.0.1:{port}", "--requests", "10")
        nursery.cancel_scope.cancel()
    assert result.returncode == 1
    _no_traceback(result)
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    # A clean close, or a reset if the request was still arriving: either is named.
    assert re.fullmatch(
        rf"triocomm bench: 127\.0\.0\.1:{port} closed the connection( \(.+\))? without "
        r"echoing the first request: is it an echo service using the length codec\? "
        r"\(check --codec\)",
        lines[0],
    ), lines


async def test_embedded_bench_json() -> None:
    result = await run_cli("bench", "--duration", "1", "--conns", "2", "--json")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["settings"]["embedded"] is True
    assert report["settings"]["duration"] == 1.0
    assert report["requests"] > 0
    assert report["errors"] == 0
    assert report["requests_per_s"] > 0
    assert set(report["latency_us"]) >= {"p50", "p90", "p99", "max"}
    assert "embedded echo service (length) on 127.0.0.1:" in result.stderr.decode()


async def test_embedded_bench_prints_report_and_histogram() -> None:
    result = await run_cli("bench", "--requests", "300", "--pipeline", "2")
    _no_traceback(result)
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert "(embedded echo service), codec length, 8 connections" in text
    assert "requests   300 in " in text
    assert "errors     0 (every reply checked)" in text
    assert re.search(r"latency    min .* p50 .* p90 .* p99 .* max ", text)
    bars = [line for line in text.splitlines() if "│" in line or "|" in line]
    assert bars
    assert sum(int(line.split()[-2]) for line in bars) == 300


@asynccontextmanager
async def benching(*args: str) -> AsyncIterator[tuple[trio.Process, Output, Output]]:
    """Run ``triocomm bench ARGS`` in the background for the block's duration."""
    process = await trio.lowlevel.open_process(
        [*CLI, "bench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    out, err = Output(), Output()
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(out.pump, process.stdout)
            nursery.start_soon(err.pump, process.stderr)
            yield process, out, err
            with trio.fail_after(RUN):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def test_sigint_ends_bench_early_and_still_reports() -> None:
    async with benching("--duration", "60", "--conns", "2", "--json") as (process, out, err):
        with trio.fail_after(STARTUP):
            # Not a terminal: one plain progress line per second.
            await err.wait_for(
                r"triocomm bench: \d+\.\d s  [\d,]+ req/s  0 errors  [\d,]+ requests\n"
            )
        process.send_signal(signal.SIGINT)
        with trio.fail_after(STARTUP):
            status = await process.wait()
    assert status == 0, err.text
    assert "Traceback" not in err.text
    report = json.loads(out.text)
    assert report["interrupted"] is True
    assert report["requests"] > 0
    assert report["errors"] == 0
    assert report["elapsed_s"] < 50


async def test_failed_connects_after_the_service_dies_are_apart_from_req_s() -> None:
    async with serving("--port", "0") as served:
        bench = benching(served.address, "--duration", "60", "--conns", "2", "--json")
        async with bench as (process, out, err):
            with trio.fail_after(STARTUP):
                await err.wait_for(r"triocomm bench: \d+\.\d s ")
            served.process.kill()
            # No timing assumed: bench is interrupted once it has seen
            # connects fail, so some failed after the last reply.
            with trio.fail_after(RUN):
                await err.wait_for(r" [\d,]+ failed connects ")
            process.send_signal(signal.SIGINT)
            with trio.fail_after(RUN):
                status = await process.wait()
    assert status == 1
    assert "Traceback" not in err.text + out.text
    report = json.loads(out.text)
    assert report["interrupted"] is True
    assert report["requests"] > 0
    assert report["connect_errors"] > 0
    assert report["connect_errors_by_cause"] == {"Connection refused": report["connect_errors"]}
    # Failed connects are not failed requests (those are in-flight ones lost).
    assert set(report["errors_by_kind"]) <= {"ConnectionLost", "closed by peer"}
    # The rate is over the time up to the last reply, not the whole run.
    assert report["measured_s"] < report["elapsed_s"]
    expected_rate = report["requests"] / report["measured_s"]
    assert report["requests_per_s"] == pytest.approx(expected_rate, rel=1e-3)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_bench_in_process_leaves_no_socket_or_task_behind(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A plain (sync) test, so main() can call trio.run itself, as the command does.
    before = set(os.listdir("/proc/self/fd"))
    status = _cli.main(["bench", "--requests", "100", "--conns", "3", "--pipeline", "2", "--json"])
    after = set(os.listdir("/proc/self/fd"))
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["requests"], report["errors"]) == (100, 0)
    # The embedded service, its listener, the client's pool: all closed.
    assert after <= before
