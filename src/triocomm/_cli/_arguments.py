"""The command line's arguments: defaults, the built-in codecs, the values
options take (addresses, sizes, durations) and the ``argparse`` parser.

Every parse error is one line under the usage (status 2); checks that
``argparse`` cannot express are made in ``check_combinations``.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import Codec, LengthPrefixed, Lines, Raw, __version__
from ._failure import EXIT_USAGE
from ._formatting import PROG, format_address, format_bytes

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
    _add_serve(commands, codec_help)
    _add_bench(commands, codec_help)
    return parser


# What add_subparsers returns (a class argparse does not name publicly).
_Commands = Any


def _add_serve(commands: _Commands, codec_help: str) -> None:
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
        "--metrics-port",
        type=functools.partial(parse_port, allow_zero=True),
        metavar="PORT",
        help="also serve Prometheus metrics over HTTP on this port, at /metrics, on the "
        "--host interface (needs triocomm[prometheus]; 0 lets the system pick)",
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
    # Lets a check made after parsing report through the command's own usage.
    serve.set_defaults(command_parser=serve)


def _add_bench(commands: _Commands, codec_help: str) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure an echo service",
        description="Send echo requests over C connections, check that every reply is the "
        "exact echo, and report requests/s, latency percentiles, a latency histogram and "
        "errors by kind. With no ADDRESS an embedded echo service is started in this process "
        "(it then shares the CPU with the load generator). Progress goes to stderr, the "
        "report to stdout. The exit status is 1 if any request or connect failed.",
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
    bench.set_defaults(command_parser=bench)


def check_combinations(args: argparse.Namespace) -> None:
    """Reject option combinations that argparse cannot express (usage error, status 2)."""
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
