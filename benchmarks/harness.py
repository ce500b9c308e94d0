"""Process plumbing shared by the benchmark programs.

Every measured program (an echo server, the load generator, a client) runs
in its own process pinned to one core, so that the two sides of a
measurement never compete for the same CPU. This module holds what those
processes and the driver in ``run.py`` have in common: pinning, the file
descriptor limit, reading a process's resident memory, starting a server
subprocess and learning its port, and the statistics of repeated runs.

It imports nothing but the standard library, so that every benchmark
process (Trio, asyncio or uvloop) can use it.
"""

from __future__ import annotations

import os
import resource
import statistics
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_CORE = 0
LOAD_CORE = 1
#: The wire format of every RPC echo scenario: a 4-byte big-endian length.
HEADER = struct.Struct("!I")


def pin_to_core(core: int | None) -> None:
    """Run this process on one core only (no-op where affinity is unsupported).

    ``core`` is taken modulo the number of cores this process may use, so the
    suite still runs (unpinned in effect) on a one-core machine.
    """
    if core is None or not hasattr(os, "sched_setaffinity"):
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {allowed[core % len(allowed)]})


def raise_nofile_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB, read from ``/proc``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS line for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time consumed so far by process ``pid``, from ``/proc``.

    CPU time per request is far less disturbed by other load on the machine
    than requests per second, so it is reported beside the throughput.
    """
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; count fields after it.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def frame(payload: bytes) -> bytes:
    """One RPC echo frame: the length header and the payload."""
    return HEADER.pack(len(payload)) + payload


def payloads(size: int, variants: int, salt: int) -> list[bytes]:
    """``variants`` distinct payloads of ``size`` bytes.

    Requests cycle through them, so a server that answered with the wrong
    frame, or swapped frames between connections (``salt`` differs per
    connection), is caught by the byte-for-byte check.
    """
    out = []
    for v in range(variants):
        seed = bytes([(salt * 31 + v * 7 + i) & 0xFF for i in range(256)])
        out.append((seed * (size // 256 + 1))[:size])
    return out


class ServerProcess:
    """A benchmark server in a subprocess pinned to the server core.

    The server prints ``PORT <n>`` once it listens; the port is read from
    there, so port 0 (any free port) can be used and two runs never collide.
    Use as a context manager: the process is terminated (then killed) on exit.
    """

    def __init__(self, kind: str, *, core: int | None = SERVER_CORE, extra: Sequence[str] = ()):
        self.kind = kind
        cmd = [sys.executable, str(HERE / "servers.py"), "--kind", kind, "--port", "0"]
        if core is not None:
            cmd += ["--core", str(core)]
        cmd += list(extra)
        self.cmd = cmd
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.close()
            raise RuntimeError(f"server {self.kind!r} did not start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # Closing stdin asks the server to stop; terminate and kill are the fallbacks.
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class Summary:
    """Median, minimum and maximum of repeated measurements."""

    median: float
    low: float
    high: float
    runs: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(statistics.median(values), min(values), max(values), tuple(values))

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": list(self.runs)}
