"""The ``triocomm`` command line.

Argument parsing, the latency histogram and the report are tested in process
(no sockets). The commands themselves run as subprocesses, exactly as a user
runs them: ``serve`` plus ``bench`` against it, the embedded ``bench``, bad
arguments, an unreachable address, and shutdown on SIGINT / SIGTERM. Every
subprocess is bounded in time and killed if a test leaves it running.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triocomm import _cli
from triocomm._cli import (
    BenchResult,
    BenchSettings,
    LatencyHistogram,
    TcpAddress,
    UnixAddress,
    parse_address,
    parse_duration,
    parse_size,
)

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
    assert _cli.histogram_rows(hist) == []
    assert _cli.render_histogram(hist) == []


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
    rows = _cli.histogram_rows(hist)
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
    text = _cli.render_report(_result(latencies), width=80)
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
    plain = _cli.render_report(_result(latencies), unicode=False)
    assert "µ" not in plain
    assert "█" not in plain
    assert "#" in plain


def test_report_lists_errors_by_kind() -> None:
    errors = Counter({"ConnectionLost": 3, "timeout (first_response)": 1})
    text = _cli.render_report(_result([10.0], errors))
    assert "errors     4 (ConnectionLost 3, timeout (first_response) 1)" in text
    assert not _result([10.0], errors).ok


def test_report_json_has_the_documented_fields() -> None:
    data = _cli.report_json(_result([50.0] * 99 + [1000.0], Counter({"EchoMismatch": 2})))
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
