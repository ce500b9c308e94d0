"""How the command line writes things for people: byte counts, latencies,
addresses, and lines on stdout or stderr."""

from __future__ import annotations

import sys
from typing import IO

PROG = "triocomm"


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


def format_address(address: object) -> str:
    """A socket address as ``bench`` takes it: ``host:port``, ``[v6]:port`` or a path.

    The same form triocomm's log lines use, so a ``serve`` startup line can
    be pasted into ``bench``.
    """
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    return str(address)


def can_encode(stream: IO[str], text: str) -> bool:
    """True when ``stream``'s encoding can write ``text`` (e.g. ``µ`` or block characters)."""
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def say(text: str, stream: IO[str] | None = None) -> None:
    """Print one line, flushed at once (stdout unless ``stream`` is given)."""
    print(text, file=stream or sys.stdout, flush=True)
