"""The ``triocomm`` command line: ``triocomm serve`` and ``triocomm bench``.

``serve`` runs an echo service on any built-in codec; ``bench`` is a load
generator built on triocomm's own client that checks every echoed reply and
reports throughput, latency percentiles and a latency histogram. With no
address, ``bench`` starts an embedded echo service in its own process, so
``triocomm bench`` alone works on a fresh install.

The module sits on top of every other layer: it drives the server
(``serve``) and the client (``open_client``, ``Target``) exactly as a user
program would, and borrows the connection layer's address formatting so its
lines name addresses the way triocomm's log lines do. The pieces that need no
network — argument parsing, the latency histogram, the report — are plain
functions and classes, tested without sockets.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import ssl
import sys
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn

import trio

from ._client import Client, Target, open_client
from ._connection import Connection, format_address
from ._errors import CommError, CommTimeout, ConnectError
from ._framing import Codec, LengthPrefixed, Lines, Raw
from ._server import Server, serve
from ._timeouts import Timeouts
from ._version import __version__

__all__ = ["main"]

PROG = "triocomm"

# -- defaults (the --help text quotes these) -----------------------------------

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7000
DEFAULT_CODEC = "length"
DEFAULT_GRACE = 5.0
DEFAULT_CONNS = 8
DEFAULT_SIZE = 64
DEFAULT_PIPELINE = 1
# Short, so that `triocomm bench` alone answers within a few seconds.
DEFAULT_DURATION = 3.0
# Upper bounds that keep a typo from asking for absurd amounts of memory or
# sockets; they are far above any useful benchmark setting.
MAX_CONNS = 10_000
MAX_PIPELINE = 10_000
MAX_SIZE = 16 * 1024 * 1024
# How long the first request may wait for its echo before the run is declared
# failed: long enough for a loaded machine, short enough to explain a wrong
# --codec (the reply never comes) while the user is still looking.
PROBE_TIMEOUT = 5.0
# After the run's end, requests in flight get this long to finish; any still
# unanswered then count as errors ("unanswered at the end").
STOP_GRACE = 2.0
# A worker whose connect failed waits this long before trying again, so an
# unreachable peer is not hammered in a tight loop.
CONNECT_BACKOFF = 0.1


# -- errors and exit codes -----------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class CliFailure(Exception):
    """A run that could not do its job, described in one line for the user.

    ``main`` prints the message after the command's name and exits with
    status 1; no traceback, since the cause is in the environment (a busy
    port, an unreachable peer), not a bug.
    """


class EchoMismatch(CommError):
    """An echoed reply differs from the request that was sent."""


# -- codecs ------------------------------------------------------------------


@dataclass(frozen=True)
class CodecChoice:
    """A built-in codec as the command line offers it."""

    name: str
    make: Callable[[], Codec[bytes, bytes]]
    #: The largest request the codec's defaults carry, in bytes.
    max_size: int
    #: True when each message comes back as one reply; False for ``raw``,
    #: whose replies are chunks that have to be reassembled.
    framed: bool
    help: str


CODECS: dict[str, CodecChoice] = {
    "length": CodecChoice(
        "length",
        LengthPrefixed,
        LengthPrefixed().max_frame,
        True,
        "4-byte big-endian length, then the payload (LengthPrefixed)",
    ),
    "lines": CodecChoice(
        "lines", Lines, Lines().max_line, True, "newline-terminated lines (Lines)"
    ),
    "raw": CodecChoice("raw", Raw, MAX_SIZE, False, "no framing: the bytes as they arrive (Raw)"),
}


# -- argument values -----------------------------------------------------------


@dataclass(frozen=True)
class TcpAddress:
    """A TCP address given as ``HOST:PORT`` or ``[IPv6]:PORT``."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_address((self.host, self.port))


@dataclass(frozen=True)
class UnixAddress:
    """A Unix socket path."""

    path: str

    def __str__(self) -> str:
        return self.path


Address = TcpAddress | UnixAddress

_ADDRESS_HELP = "expected HOST:PORT, [IPv6]:PORT or a Unix socket path containing '/'"


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """Return the port number in ``text`` (1-65535, or 0 when ``allow_zero``)."""
    lowest = 0 if allow_zero else 1
    if not text.isdigit() or not lowest <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be a number {lowest}-65535, got {text!r}")
    return int(text)


def parse_address(text: str) -> Address:
    """Parse a bench ``ADDRESS``: ``HOST:PORT``, ``[IPv6]:PORT`` or a Unix path.

    A Unix path must contain a ``/`` (write ``./sock`` for a socket in the
    current folder): that is what tells ``localhost:7000`` apart from a file
    named so. A bare IPv6 address needs brackets, as in URLs, because its
    colons would otherwise swallow the port.
    """
    if "/" in text:
        return UnixAddress(text)
    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]+)\]:(\w*)", text)
        if match is None:
            raise argparse.ArgumentTypeError(f"bad address {text!r}: {_ADDRESS_HELP}")
        host, port = match.group(1), match.group(2)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise argparse.ArgumentTypeError(f"bad address {text!r}: {_ADDRESS_HELP}")
        if ":" in host:
            raise argparse.ArgumentTypeError(
                f"bad address {text!r}: put an IPv6 address in brackets, as in [::1]:{port}"
            )
    return TcpAddress(host, parse_port(port))


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Parse a message size: ``64``, ``64B``, ``1k``, ``4KiB``, ``1M`` (units are 1024-based)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:([kKmMgG])(?:i?[bB])?|[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"bad size {text!r}: expected a number of bytes, optionally with a unit "
            "(B, K/KiB, M/MiB), e.g. 64, 1k or 64KiB"
        )
    size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if not 1 <= size <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"size must be between 1 byte and {format_bytes(MAX_SIZE)}, got {text!r}"
        )
    return size


_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0}


def parse_duration(text: str) -> float:
    """Parse a positive duration: ``3``, ``2.5s``, ``500ms``, ``1m`` (seconds by default)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|min|m)?\s*", text)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or ""] if match else 0.0
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(
            f"bad duration {text!r}: expected a positive number of seconds, e.g. 3, 2.5s or 500ms"
        )
    return seconds


def _bounded_int(name: str, lowest: int, highest: int | None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text) if re.fullmatch(r"\s*\d+\s*", text) else None
        if value is None or value < lowest or (highest is not None and value > highest):
            bound = f"between {lowest} and {highest}" if highest else f"at least {lowest}"
            raise argparse.ArgumentTypeError(f"{name} must be a whole number {bound}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _existing_file(text: str) -> str:
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None
    return text


# -- the parser --------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are exactly: usage, one error line, status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        # Only the first line: argparse messages are one line, and a value's
        # own error (ours) is written to be one line too.
        first = message.splitlines()[0] if message else "bad arguments"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {first}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``triocomm`` command."""
    parser = _Parser(
        prog=PROG,
        description="triocomm: message-oriented networking for Trio. "
        "Run an echo service, or measure one.",
        epilog="Exit status: 0 success, 1 failed run, 2 bad arguments. "
        f"'{PROG} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    codec_help = "; ".join(f"{c.name}: {c.help}" for c in CODECS.values())

    serve = commands.add_parser(
        "serve",
        help="run an echo service",
        description="Run an echo service: every message received is sent back unchanged. "
        "SIGINT (Ctrl-C) or SIGTERM shuts it down gracefully: it stops accepting, lets "
        "requests in flight finish (up to --grace seconds) and exits with status 0.",
    )
    serve.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"interface to listen on (default {DEFAULT_HOST}; '*' for every interface)",
    )
    where = serve.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        type=functools.partial(parse_port, allow_zero=True),
        default=DEFAULT_PORT,
        help=f"TCP port (default {DEFAULT_PORT}; 0 lets the system pick a free one)",
    )
    where.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead of TCP")
    serve.add_argument(
        "--codec", choices=CODECS, default=DEFAULT_CODEC, help=f"{codec_help} (default %(default)s)"
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        type=_existing_file,
        help="serve TLS with this certificate (PEM)",
    )
    serve.add_argument(
        "--tls-key", metavar="FILE", type=_existing_file, help="private key for --tls-cert (PEM)"
    )
    serve.add_argument(
        "--grace",
        type=_non_negative_seconds,
        default=DEFAULT_GRACE,
        metavar="SECONDS",
        help="on shutdown, how long requests in flight may take to finish "
        f"(default {DEFAULT_GRACE:g})",
    )
    serve.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log connection opens and closes (-vv: everything triocomm logs)",
    )

    bench = commands.add_parser(
        "bench",
        help="measure an echo service",
        description="Send echo requests over C connections, check that every reply is the "
        "exact echo, and report requests/s, latency percentiles, a latency histogram and "
        "errors by kind. With no ADDRESS an embedded echo service is started in this process "
        "(it then shares the CPU with the load generator). Progress goes to stderr, the "
        "report to stdout. The exit status is 1 if any request failed.",
    )
    bench.add_argument(
        "address",
        nargs="?",
        type=parse_address,
        metavar="ADDRESS",
        help="HOST:PORT, [IPv6]:PORT or a Unix socket path containing '/' "
        "(default: an embedded echo service on 127.0.0.1)",
    )
    bench.add_argument(
        "--codec", choices=CODECS, default=DEFAULT_CODEC, help=f"{codec_help} (default %(default)s)"
    )
    bench.add_argument(
        "--conns",
        type=_bounded_int("conns", 1, MAX_CONNS),
        default=DEFAULT_CONNS,
        metavar="C",
        help=f"concurrent connections (default {DEFAULT_CONNS})",
    )
    bench.add_argument(
        "--size",
        type=parse_size,
        default=DEFAULT_SIZE,
        metavar="S",
        help=f"bytes per request: 64, 1k, 64KiB, 1M (default {DEFAULT_SIZE})",
    )
    bench.add_argument(
        "--pipeline",
        type=_bounded_int("pipeline", 1, MAX_PIPELINE),
        default=DEFAULT_PIPELINE,
        metavar="D",
        help="requests in flight per connection: D are sent in one write, then D replies "
        f"are read (default {DEFAULT_PIPELINE})",
    )
    amount = bench.add_mutually_exclusive_group()
    amount.add_argument(
        "--duration",
        type=parse_duration,
        metavar="T",
        help=f"run for T: 3, 2.5s, 500ms, 1m (default {DEFAULT_DURATION:g}s)",
    )
    amount.add_argument(
        "--requests",
        type=_bounded_int("requests", 1, None),
        metavar="N",
        help="run until N requests are done, instead of for a time",
    )
    bench.add_argument(
        "--tls-ca",
        metavar="FILE",
        type=_existing_file,
        help="connect with TLS, trusting the CA certificate(s) in FILE (PEM)",
    )
    bench.add_argument(
        "--json", action="store_true", help="print the report as one JSON object on stdout"
    )
    # Lets a check made after parsing report through the command's own usage.
    serve.set_defaults(command_parser=serve)
    bench.set_defaults(command_parser=bench)
    return parser


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject option combinations that argparse cannot express."""
    sub: argparse.ArgumentParser = args.command_parser
    if args.command == "serve":
        if bool(args.tls_cert) != bool(args.tls_key):
            sub.error("--tls-cert and --tls-key go together: give both or neither")
        if args.unix is not None and args.host != DEFAULT_HOST:
            sub.error("--host does not apply to --unix")
    else:
        choice = CODECS[args.codec]
        if args.size > choice.max_size:
            sub.error(
                f"--size {format_bytes(args.size)} is larger than the {choice.name} codec "
                f"allows ({format_bytes(choice.max_size)})"
            )
        if args.tls_ca and (args.address is None or isinstance(args.address, UnixAddress)):
            sub.error("--tls-ca needs a TCP ADDRESS (the embedded service does not use TLS)")


# -- formatting --------------------------------------------------------------


def _can_encode(stream: IO[str], text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def format_bytes(size: float) -> str:
    """``64 B``, ``1 KiB``, ``1.5 MiB``: a byte count for people."""
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.{0 if size == int(size) else 1}f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_latency(us: float, *, micro: str = "µs") -> str:
    """A latency in microseconds for people: ``87 µs``, ``1.25 ms``, ``2.1 s``."""
    if us < 1000:
        return f"{us:.0f} {micro}"
    if us < 1_000_000:
        ms = us / 1000
        return f"{ms:.{2 if ms < 10 else 1 if ms < 100 else 0}f} ms"
    return f"{us / 1_000_000:.2f} s"


# -- latency recording ---------------------------------------------------------


class LatencyHistogram:
    """Latencies in microseconds, kept in log-spaced buckets of bounded memory.

    Below 64 µs every microsecond has its own bucket; above, each power of two
    is split into 32 buckets, so a value is known to within 1/32 (about 3 %)
    of itself, like an HDR histogram with five bits of precision. That bounds
    memory to about 1200 counters however long the run,
    while percentiles stay accurate to well under the noise of a benchmark.
    The exact minimum, maximum and sum are kept on the side.
    """

    SUB_BITS = 5
    _SUB = 1 << SUB_BITS  # buckets per power of two
    # Values at or above 2**40 µs (about 12 days) share the last bucket.
    _TOP_BITS = 40

    def __init__(self) -> None:
        self._counts = [0] * self._index(1 << self._TOP_BITS)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = 0.0

    @classmethod
    def _index(cls, value: int) -> int:
        sub = cls._SUB
        if value < 2 * sub:
            return value
        shift = value.bit_length() - cls.SUB_BITS - 1
        return (shift + 1) * sub + (value >> shift) - sub

    @classmethod
    def bucket_range(cls, index: int) -> tuple[int, int]:
        """The lowest and highest whole microsecond that land in bucket ``index``."""
        sub = cls._SUB
        if index < 2 * sub:
            return index, index
        shift = index // sub - 1
        mantissa = index % sub + sub
        return mantissa << shift, ((mantissa + 1) << shift) - 1

    def record(self, us: float) -> None:
        """Add one latency, in microseconds (negative values count as 0)."""
        us = max(us, 0.0)
        index = min(self._index(int(us)), len(self._counts) - 1)
        self._counts[index] += 1
        self._count += 1
        self._sum += us
        if us < self._min:
            self._min = us
        if us > self._max:
            self._max = us

    @property
    def count(self) -> int:
        """How many latencies were recorded."""
        return self._count

    @property
    def min(self) -> float:
        """The smallest latency (0 when empty)."""
        return self._min if self._count else 0.0

    @property
    def max(self) -> float:
        """The largest latency (0 when empty)."""
        return self._max

    @property
    def mean(self) -> float:
        """The average latency (0 when empty)."""
        return self._sum / self._count if self._count else 0.0

    def percentile(self, q: float) -> float:
        """The latency below or at which a fraction ``q`` (0-1) of requests finished.

        Nearest-rank definition; the value reported is the middle of its
        bucket, clamped to the exact minimum and maximum, so ``percentile(1)``
        is the true maximum.
        """
        if not 0 <= q <= 1:
            raise ValueError(f"q must be between 0 and 1, got {q!r}")
        if not self._count:
            return 0.0
        rank = max(1, math.ceil(q * self._count))
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                if index == len(self._counts) - 1:
                    return self._max  # the overflow bucket has no upper bound
                low, high = self.bucket_range(index)
                return min(max((low + high + 1) / 2, self._min), self._max)
        raise AssertionError("rank beyond count")  # pragma: no cover

    def buckets(self) -> list[tuple[int, int, int]]:
        """Every non-empty bucket as ``(lowest_us, highest_us, count)``, in order."""
        return [
            (*self.bucket_range(index), count) for index, count in enumerate(self._counts) if count
        ]


def histogram_rows(hist: LatencyHistogram, rows: int = 12) -> list[tuple[float, float, int]]:
    """Group the fine buckets into at most ``rows`` log-spaced ranges for display.

    Returns ``(from_us, to_us, count)`` per range, from the minimum to the
    maximum latency; empty ranges between them are kept, because a gap in a
    latency distribution is worth seeing.
    """
    buckets = hist.buckets()
    if not buckets:
        return []
    low = max(hist.min, 1.0)
    high = max(hist.max, low) * 1.000001 + 1e-9
    if high / low < 1.01:
        return [(hist.min, hist.max, hist.count)]
    ratio = (high / low) ** (1 / rows)
    edges = [low * ratio**k for k in range(rows + 1)]
    counts = [0] * rows
    for first, last, count in buckets:
        # A fine bucket counts in the range that holds its middle.
        middle = (first + last + 1) / 2
        row = 0 if middle <= low else int(math.log(middle / low) / math.log(ratio))
        counts[min(max(row, 0), rows - 1)] += count
    edges[0], edges[-1] = hist.min, hist.max
    return [(edges[k], edges[k + 1], counts[k]) for k in range(rows)]


def render_histogram(hist: LatencyHistogram, *, width: int = 80, unicode: bool = True) -> list[str]:
    """Draw the latency histogram as text lines, one bar per range."""
    rows = histogram_rows(hist)
    if not rows:
        return []
    micro = "µs" if unicode else "us"
    labels = [
        f"{format_latency(a, micro=micro):>8} - {format_latency(b, micro=micro):<8}"
        for a, b, _ in rows
    ]
    peak = max(count for _, _, count in rows) or 1
    total = hist.count
    count_width = len(str(peak))
    # label, " |", bar, " ", count, "  ", "100.0%"
    bar_width = max(10, width - len(labels[0]) - count_width - 12)
    lines = []
    for label, (_, _, count) in zip(labels, rows, strict=True):
        lines.append(
            f"  {label}|{_bar(count / peak * bar_width, unicode):<{bar_width}} "
            f"{count:>{count_width}} {100 * count / total:5.1f}%"
        )
    return lines


_EIGHTHS = " ▏▎▍▌▋▊▉"


def _bar(cells: float, unicode: bool) -> str:
    whole = int(cells)
    if not unicode:
        return "#" * whole
    eighths = int((cells - whole) * 8)
    return "█" * whole + (_EIGHTHS[eighths] if eighths else "")


# -- the bench report ----------------------------------------------------------


@dataclass
class BenchSettings:
    """What ``bench`` was asked to do, as the report describes it."""

    address: str
    embedded: bool
    codec: str
    conns: int
    size: int
    pipeline: int
    duration: float | None
    requests: int | None
    tls: bool = False


@dataclass
class BenchResult:
    """What a ``bench`` run measured."""

    settings: BenchSettings
    requests: int
    elapsed: float
    latency: LatencyHistogram
    errors: Counter[str]
    interrupted: bool = False

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second of run time."""
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        """Failed requests, every kind together."""
        return sum(self.errors.values())

    @property
    def ok(self) -> bool:
        """True when requests were done and none failed."""
        return self.requests > 0 and not self.errors


_PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def report_json(result: BenchResult) -> dict[str, Any]:
    """The report as a JSON-ready dict (what ``--json`` prints)."""
    hist = result.latency
    latency: dict[str, float] = {"min": hist.min, "mean": hist.mean}
    latency.update({name: hist.percentile(q) for name, q in _PERCENTILES})
    latency["max"] = hist.max
    return {
        "triocomm": __version__,
        "settings": dataclasses.asdict(result.settings),
        "requests": result.requests,
        "elapsed_s": round(result.elapsed, 6),
        "requests_per_s": round(result.requests_per_s, 1),
        "bytes_per_s": round(result.requests_per_s * result.settings.size, 1),
        "latency_us": {name: round(value, 1) for name, value in latency.items()},
        "histogram": [
            {"from_us": round(a, 1), "to_us": round(b, 1), "count": count}
            for a, b, count in histogram_rows(hist)
        ],
        "errors": result.error_count,
        "errors_by_kind": dict(sorted(result.errors.items())),
        "interrupted": result.interrupted,
    }


def render_report(result: BenchResult, *, width: int = 80, unicode: bool = True) -> str:
    """The report as text for a terminal."""
    s = result.settings
    hist = result.latency
    micro = "µs" if unicode else "us"
    where = f"{s.address} (embedded echo service)" if s.embedded else s.address
    amount = f"{s.requests} requests" if s.requests is not None else f"{s.duration:g} s"
    lines = [
        f"{PROG} bench: {where}{' over TLS' if s.tls else ''}, codec {s.codec}, "
        f"{s.conns} connection{'s' if s.conns != 1 else ''}, {format_bytes(s.size)} messages, "
        f"pipeline {s.pipeline}, {amount}" + (" (interrupted)" if result.interrupted else ""),
        f"  requests   {result.requests} in {result.elapsed:.2f} s = "
        f"{result.requests_per_s:,.0f} req/s "
        f"({format_bytes(result.requests_per_s * s.size)}/s each way)",
    ]
    if result.errors:
        kinds = ", ".join(f"{kind} {count}" for kind, count in result.errors.most_common())
        lines.append(f"  errors     {result.error_count} ({kinds})")
    else:
        lines.append("  errors     0 (every reply checked)")
    if hist.count:
        figures = [f"min {format_latency(hist.min, micro=micro)}"]
        figures += [
            f"{name} {format_latency(hist.percentile(q), micro=micro)}"
            for name, q in _PERCENTILES[:3]
        ]
        figures.append(f"max {format_latency(hist.max, micro=micro)}")
        lines.append("  latency    " + "  ".join(figures))
        lines.append("")
        lines.append("  latency histogram (requests per range, share of all)")
        lines.extend(render_histogram(hist, width=width, unicode=unicode))
    return "\n".join(lines)


# -- the echo service ------------------------------------------------------------


async def _echo(request: bytes, conn: object) -> bytes:
    # One reply per request; with the raw codec a "request" is whatever chunk
    # arrived, and echoing chunk by chunk still returns the bytes in order.
    return request


def _server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise CliFailure(
            f"cannot load the TLS certificate {cert!r} with key {key!r}: {exc}"
        ) from None
    return context


async def _start_echo_service(
    nursery: trio.Nursery,
    *,
    codec: Codec[bytes, bytes],
    port: int | None = None,
    host: str | None = None,
    path: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Server:
    """Start ``triocomm.serve`` with the echo handler in ``nursery``; return its Server."""
    where = path if path is not None else str(TcpAddress(host or "*", port or 0))
    try:
        server: Server = await nursery.start(
            functools.partial(
                serve, _echo, port, host=host, path=path, codec=codec, ssl_context=ssl_context
            )
        )
        return server
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, OSError):
            reason = leaf.strerror or str(leaf)
            raise CliFailure(f"cannot listen on {where}: {reason}") from None
        raise


def _configure_logging(verbosity: int) -> None:
    """Send triocomm's log to stderr.

    ``-v``: warnings and notices (INFO) from every part of triocomm, plus each
    connection's open and close (DEBUG lines of ``triocomm.connection``).
    ``-vv``: everything at DEBUG. Without ``-v`` only warnings and errors show
    (through Python's last-resort handler), e.g. a peer that sent bad input.
    """
    if not verbosity:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("triocomm")
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbosity == 1 else logging.DEBUG)
    logging.getLogger("triocomm.connection").setLevel(logging.DEBUG)


def _say(text: str, stream: IO[str] | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


async def _serve_command(args: argparse.Namespace) -> int:
    _configure_logging(args.verbose)
    choice = CODECS[args.codec]
    ssl_context = _server_ssl_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    # The receiver is open before the service announces itself, so a signal
    # sent as soon as the "listening" line is read is never missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            if args.unix is not None:
                server = await _start_echo_service(
                    nursery, codec=choice.make(), path=args.unix, ssl_context=ssl_context
                )
            else:
                host = None if args.host == "*" else args.host
                server = await _start_echo_service(
                    nursery, codec=choice.make(), port=args.port, host=host, ssl_context=ssl_context
                )
            where = ", ".join(format_address(address) for address in server.addresses)
            tls = ", TLS" if ssl_context else ""
            _say(f"{PROG}: echo service ({choice.name}{tls}) listening on {where}")
            async for signum in signals:
                _say(
                    f"{PROG}: {signal.Signals(signum).name} received, shutting down "
                    f"(requests in flight get up to {args.grace:g} s; signal again to stop now)"
                )
                break
            with trio.CancelScope() as shutdown:
                nursery.start_soon(_cancel_on_signal, signals, shutdown)
                await server.shutdown(grace=args.grace)
            nursery.cancel_scope.cancel()
    stats = server.stats
    _say(
        f"{PROG}: echo service stopped "
        f"({stats.connections_total} connections, {stats.sessions} requests served)"
    )
    return EXIT_OK


async def _cancel_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for _ in signals:
        scope.cancel()
        return


# -- the load generator ------------------------------------------------------------


def error_kind(exc: BaseException) -> str:
    """How ``bench`` files a failed request in its errors-by-kind table."""
    if isinstance(exc, CommTimeout):
        return f"timeout ({exc.phase})"
    if isinstance(exc, trio.EndOfChannel):
        return "closed by peer"
    return type(exc).__name__


def payload_maker(size: int) -> Callable[[int, int], bytes]:
    """Return ``make(worker, serial)``: a distinct request of ``size`` bytes.

    Each request starts with its worker and serial number, so a reply that
    answers the wrong request (a desynchronised connection) is caught, not
    just a corrupted one. The bytes are letters, digits, ``.`` and ``:``:
    never a newline, so the same payloads work for the ``lines`` codec.
    """
    letters = b"abcdefghijklmnopqrstuvwxyz"
    filler = (letters * (size // len(letters) + 1))[:size]

    def make(worker: int, serial: int) -> bytes:
        tag = b"%d.%d:" % (worker, serial)
        return tag[:size] + filler[len(tag) :]

    return make


class LoadRun:
    """The shared state of one ``bench`` run: the request budget and what was measured.

    Workers ``claim`` requests before sending them, so ``--requests N`` sends
    exactly N; ``stop`` ends the claiming, after which requests already in
    flight may finish. Every request ends either in ``done`` (with its
    latency recorded) or in ``errors``.
    """

    def __init__(self, requests: int | None, clock: Callable[[], float] = trio.current_time):
        self.remaining = requests
        self.stopping = False
        self.stopped = trio.Event()
        self.interrupted = False
        self.done = 0
        self.errors: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self.clock = clock
        self.started_at = clock()
        self.finished_at: float | None = None

    def claim(self, depth: int) -> int:
        """Take up to ``depth`` requests from the budget (0: the run is over)."""
        if self.stopping:
            return 0
        if self.remaining is None:
            return depth
        count = min(depth, self.remaining)
        self.remaining -= count
        return count

    def answered(self, sent_at: float) -> None:
        """Count one checked reply to a request sent at ``sent_at``."""
        now = self.clock()
        self.latency.record((now - sent_at) * 1e6)
        self.done += 1

    def failed(self, exc: BaseException, count: int) -> None:
        """Count ``count`` requests lost to ``exc``."""
        self.errors[error_kind(exc)] += count

    @property
    def error_count(self) -> int:
        """Failed requests so far."""
        return sum(self.errors.values())

    @property
    def elapsed(self) -> float:
        """From the start to the moment the last worker ended (or to now, while running)."""
        end = self.finished_at if self.finished_at is not None else self.clock()
        return end - self.started_at


Session = Callable[[list[bytes], Callable[[float], None]], Any]


def _check(reply: bytes, request: bytes) -> None:
    if reply != request:
        raise EchoMismatch(
            f"reply of {len(reply)} bytes does not echo the {len(request)}-byte request "
            f"(starts {reply[:16]!r}, expected {request[:16]!r})"
        )


def make_session(
    client: Client,
    target: Target[bytes, bytes],
    *,
    framed: bool,
    depth: int,
    timeouts: Timeouts | None = None,
) -> Session:
    """Return ``session(payloads, answered)``: send the payloads, check every echo.

    One request without pipelining is one ``client.request`` (the API most
    programs use). A pipelined batch is one ``client.run`` session: the D
    requests go out in one write, then D replies are read. The raw codec has
    no message boundaries, so its replies are reassembled and compared byte
    for byte. ``answered(sent_at)`` is called for each checked reply.
    """
    clock = trio.current_time

    async def one_request(payloads: list[bytes], answered: Callable[[float], None]) -> None:
        sent_at = clock()
        reply = await client.request(target, payloads[0], timeouts=timeouts)
        _check(reply, payloads[0])
        answered(sent_at)

    async def pipelined(
        conn: Connection[bytes, bytes], payloads: list[bytes], answered: Callable[[float], None]
    ) -> None:
        sent_at = clock()
        await conn.send_many(payloads)
        for payload in payloads:
            _check(await conn.receive(), payload)
            answered(sent_at)

    async def raw(
        conn: Connection[bytes, bytes], payloads: list[bytes], answered: Callable[[float], None]
    ) -> None:
        sent_at = clock()
        await conn.send_many(payloads)
        expected = b"".join(payloads)
        size = len(payloads[0])
        received = 0
        while received < len(expected):
            chunk = await conn.receive()
            end = received + len(chunk)
            if chunk != expected[received:end]:
                raise EchoMismatch(f"bytes {received}-{end} of the echo differ from what was sent")
            # Every request whose last byte has now arrived is answered.
            for _ in range(received // size, end // size):
                answered(sent_at)
            received = end

    async def batch(payloads: list[bytes], answered: Callable[[float], None]) -> None:
        # A retry (a stale pooled connection) only happens before any reply
        # byte, so no request is counted twice.
        body = pipelined if framed else raw
        await client.run(target, body, payloads, answered, timeouts=timeouts)

    return one_request if framed and depth == 1 else batch


async def _worker(index: int, run: LoadRun, session: Session, depth: int, size: int) -> None:
    make = payload_maker(size)
    serial = 0
    answered_here = 0

    def answered(sent_at: float) -> None:
        nonlocal answered_here
        answered_here += 1
        run.answered(sent_at)

    while count := run.claim(depth):
        payloads = [make(index, serial + k) for k in range(count)]
        serial += count
        answered_here = 0
        try:
            await session(payloads, answered)
        except trio.Cancelled:
            # Abandoned when the run's end grace ran out: still unanswered.
            run.errors["unanswered at the end"] += count - answered_here
            raise
        except Exception as exc:
            # The requests of this batch that got no checked reply failed.
            run.failed(exc, count - answered_here)
            if isinstance(exc, ConnectError):
                await trio.sleep(CONNECT_BACKOFF)


# -- progress --------------------------------------------------------------------


class ProgressDisplay:
    """Live progress of a run, on stderr (so that stdout holds only the report).

    On a terminal one line is rewritten in place four times a second; anywhere
    else (a pipe, a CI log) one plain line is printed per second, which reads
    well in a log and never fills it with carriage returns. Hand-written
    rather than taken from a terminal UI library: it is one line of text, and
    the command line then needs nothing beyond Trio.
    """

    BAR = 20

    def __init__(
        self,
        stream: IO[str],
        *,
        live: bool,
        duration: float | None,
        requests: int | None,
        unicode: bool = True,
    ) -> None:
        self.stream = stream
        self.live = live
        self.duration = duration
        self.requests = requests
        self.unicode = unicode
        self.interval = 0.25 if live else 1.0
        self._shown = False

    def line(self, elapsed: float, done: int, errors: int, rate: float) -> str:
        """The text of one progress update."""
        if self.requests is not None:
            fraction = done / self.requests
            amount = f"{done:,}/{self.requests:,} requests"
        else:
            fraction = elapsed / self.duration if self.duration else 0.0
            amount = f"{done:,} requests"
        figures = f"{rate:,.0f} req/s  {errors:,} errors"
        if not self.live:
            return f"{PROG} bench: {elapsed:.1f} s  {figures}  {amount}"
        full, empty = ("█", "░") if self.unicode else ("#", "-")
        cells = min(self.BAR, int(fraction * self.BAR))
        bar = full * cells + empty * (self.BAR - cells)
        clock = f"{elapsed:4.1f}/{self.duration:g} s" if self.duration else f"{elapsed:4.1f} s"
        return f"{clock} [{bar}] {figures}  {amount}"

    def show(self, elapsed: float, done: int, errors: int, rate: float) -> None:
        """Print one update."""
        text = self.line(elapsed, done, errors, rate)
        if self.live:
            # Clear to the end of the line: the new text may be shorter.
            self.stream.write(f"\r{text}\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """Remove the live line, so the report starts on a clean line."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def _show_progress(run: LoadRun, display: ProgressDisplay) -> None:
    # Requests/s is measured over the last second, not since the start, so
    # the display shows the present rate (a stall shows as a drop at once).
    history: deque[tuple[float, int]] = deque([(run.started_at, 0)])
    next_at = run.started_at
    while True:
        next_at += display.interval
        await trio.sleep_until(next_at)
        now = run.clock()
        history.append((now, run.done))
        while len(history) > 2 and now - history[1][0] >= 1.0:
            history.popleft()
        then, done_then = history[0]
        rate = (run.done - done_then) / (now - then) if now > then else 0.0
        display.show(now - run.started_at, run.done, run.error_count, rate)


# -- the bench command -------------------------------------------------------------

# Per-phase limits of the load generator's requests. A request that gets no
# reply fails after `inactivity` seconds and is counted as an error, so a run
# always ends.
BENCH_TIMEOUTS = Timeouts(connect=PROBE_TIMEOUT, inactivity=10.0)


class _BenchControl:
    """What a SIGINT / SIGTERM does during ``bench``: the first ends the load
    and still prints the report; a second one (or one before the load has
    started) stops at once."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope
        self.stop_load: Callable[[], None] | None = None
        self.aborted = False

    async def watch(self, signals: Any) -> None:
        async for _ in signals:
            if self.stop_load is not None:
                stop, self.stop_load = self.stop_load, None
                stop()
            else:
                self.aborted = True
                self.scope.cancel()


def _cause(exc: BaseException) -> str:
    """The most specific reason behind ``exc``: the innermost OS error message
    along its causes and inside exception groups ("Connection refused" rather
    than "all attempts to connect to ... failed")."""
    reason = None
    stack = [exc]
    for _ in range(100):  # bounded, whatever shape the chain has
        if not stack:
            break
        current = stack.pop()
        if isinstance(current, ssl.SSLError):
            reason = str(current)
        elif isinstance(current, OSError) and (current.errno or 0) in errno.errorcode:
            # Trio words it "Error connecting to (...): Connection refused";
            # the address is in our own message already.
            reason = os.strerror(current.errno or 0)
        elif isinstance(current, OSError) and current.strerror:
            reason = current.strerror  # e.g. a resolver error, whose errno is not an errno
        inner = getattr(current, "exceptions", None)
        if isinstance(inner, tuple):
            stack.extend(reversed(inner))
        if current.__cause__ is not None:
            stack.append(current.__cause__)
    return reason or str(exc.__cause__ or exc)


async def _probe(session: Session, settings: BenchSettings) -> None:
    """Send one request before the load starts, turning the usual ways a run
    cannot even begin into one clear line each."""
    where, codec = settings.address, settings.codec
    try:
        await session([payload_maker(settings.size)(0, 0)], lambda sent_at: None)
    except ConnectError as exc:
        raise CliFailure(f"cannot connect to {where}: {_cause(exc)}") from None
    except CommTimeout as exc:
        raise CliFailure(
            f"no echo from {where} within {exc.limit:g} s ({exc.phase} timeout): "
            f"is it an echo service using the {codec} codec?"
        ) from None
    except EchoMismatch as exc:
        raise CliFailure(
            f"{where} did not echo the request ({exc}): "
            f"is it an echo service using the {codec} codec?"
        ) from None
    except (CommError, OSError, trio.BrokenResourceError, trio.EndOfChannel) as exc:
        raise CliFailure(
            f"the first request to {where} failed: {error_kind(exc)}: {exc or 'no reason given'}"
        ) from None


def _target(
    address: Address, codec: Codec[bytes, bytes], conns: int, tls_ca: str | None
) -> Target[bytes, bytes]:
    if isinstance(address, UnixAddress):
        return Target.unix(address.path, codec, max_connections=conns)
    ssl_context = None
    if tls_ca:
        try:
            ssl_context = ssl.create_default_context(cafile=tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise CliFailure(f"cannot load the CA certificate {tls_ca!r}: {exc}") from None
    return Target(address.host, address.port, codec, ssl_context=ssl_context, max_connections=conns)


async def _measure(
    address: Address,
    codec: Codec[bytes, bytes],
    settings: BenchSettings,
    tls_ca: str | None,
    control: _BenchControl,
    display: ProgressDisplay,
) -> BenchResult:
    framed = CODECS[settings.codec].framed
    target = _target(address, codec, settings.conns, tls_ca)
    async with open_client(timeouts=BENCH_TIMEOUTS) as client:
        probe_timeouts = BENCH_TIMEOUTS.replace(first_response=PROBE_TIMEOUT)
        await _probe(
            make_session(client, target, framed=framed, depth=1, timeouts=probe_timeouts),
            settings,
        )
        session = make_session(client, target, framed=framed, depth=settings.pipeline)
        run = LoadRun(settings.requests)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_show_progress, run, display)
            with trio.CancelScope() as workers_scope:

                def stop() -> None:
                    run.stopping = True
                    run.stopped.set()
                    # Requests in flight get a short grace, then are abandoned.
                    workers_scope.deadline = min(
                        workers_scope.deadline, trio.current_time() + STOP_GRACE
                    )

                def interrupt() -> None:
                    run.interrupted = True
                    stop()

                control.stop_load = interrupt
                async with trio.open_nursery() as workers:
                    if settings.duration is not None:
                        workers.start_soon(_stop_after, settings.duration, run, stop)
                    for index in range(settings.conns):
                        workers.start_soon(
                            _worker, index, run, session, settings.pipeline, settings.size
                        )
            run.finished_at = run.clock()
            control.stop_load = None
            nursery.cancel_scope.cancel()
        display.close()
    return BenchResult(settings, run.done, run.elapsed, run.latency, run.errors, run.interrupted)


async def _stop_after(duration: float, run: LoadRun, stop: Callable[[], None]) -> None:
    # Also wakes when the run is stopped early (interrupted), so the timer
    # does not keep the workers' nursery open.
    with trio.move_on_at(run.started_at + duration):
        await run.stopped.wait()
    stop()


async def _bench_command(args: argparse.Namespace) -> int:
    choice = CODECS[args.codec]
    codec = choice.make()
    embedded = args.address is None
    duration = None if args.requests is not None else (args.duration or DEFAULT_DURATION)
    unicode = _can_encode(sys.stdout, "µ█▏") and _can_encode(sys.stderr, "█░")
    display = ProgressDisplay(
        sys.stderr,
        live=sys.stderr.isatty(),
        duration=duration,
        requests=args.requests,
        unicode=unicode,
    )
    result: BenchResult | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            control = _BenchControl(nursery.cancel_scope)
            nursery.start_soon(control.watch, signals)
            address: Address
            if embedded:
                server = await _start_echo_service(nursery, codec=codec, port=0, host=DEFAULT_HOST)
                assert server.port is not None  # a TCP service has a port
                address = TcpAddress(DEFAULT_HOST, server.port)
                _say(
                    f"{PROG} bench: embedded echo service ({choice.name}) on {address}", sys.stderr
                )
            else:
                address = args.address
            settings = BenchSettings(
                address=str(address),
                embedded=embedded,
                codec=choice.name,
                conns=args.conns,
                size=args.size,
                pipeline=args.pipeline,
                duration=duration,
                requests=args.requests,
                tls=bool(args.tls_ca),
            )
            result = await _measure(address, codec, settings, args.tls_ca, control, display)
            # Stops the embedded service (if any) and the signal watcher.
            nursery.cancel_scope.cancel()
    if result is None:
        raise CliFailure("interrupted before the load started")
    if args.json:
        _say(json.dumps(report_json(result)))
    else:
        width = shutil.get_terminal_size((80, 24)).columns
        _say(render_report(result, width=min(width, 100), unicode=unicode))
    return EXIT_OK if result.ok else EXIT_FAILED


# -- entry point ---------------------------------------------------------------


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, or ``exc``."""
    # Duck-typed: on Python 3.10 the groups come from the exceptiongroup
    # backport, which this module need not import for one isinstance check.
    while True:
        inner = getattr(exc, "exceptions", None)
        if not isinstance(inner, tuple) or len(inner) != 1:
            return exc
        exc = inner[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Bad arguments exit with status 2 (through argparse); a run that fails
    for a reason outside the program (a busy port, an unreachable peer)
    prints one line and returns 1; a failed ``bench`` (any request failed)
    prints its report and returns 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    command = _serve_command if args.command == "serve" else _bench_command
    try:
        return trio.run(command, args)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, CliFailure):
            print(f"{PROG} {args.command}: {leaf}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        if isinstance(leaf, BrokenPipeError):
            # The reader went away (`triocomm bench | head -3`): nothing to
            # report to. Point stdout at /dev/null so the interpreter's final
            # flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
        raise
