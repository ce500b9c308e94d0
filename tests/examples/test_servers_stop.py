"""The example servers behave like real servers when run as programs.

Each one is started as a subprocess on port 0, as a user would start it: it
must print one line saying where it listens (with the real port), answer a
request, and on SIGINT (Ctrl-C) or SIGTERM shut down gracefully, exiting with
status 0 and no traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dnswire
import pytest
import trio

import triocomm
from conftest import EXAMPLES

# The example imports the triocomm these tests run against (an installed one,
# or the work tree's through a relative PYTHONPATH that the child's cwd breaks).
TRIOCOMM_ROOT = str(Path(triocomm.__file__).resolve().parents[1])

# Bounds how long a broken example can hang a test; never reached when it works.
HANG_GUARD = 30.0


_DNS_QUERY = b"\x00\x1e" + dnswire.query(0x7C01, "example.test", dnswire.TYPE_A)
_DNS_REPLY = b"\x00\x2e\x7c\x01\x85\x00"  # 46 bytes: id, flags qr aa rd


@dataclass(frozen=True)
class Example:
    script: str
    args: tuple[str, ...]
    request: bytes
    reply_starts: bytes
    # serve_connections gives an HTTP handler no "between requests" moment
    # that a shutdown could use, so that client asks to close instead.
    keeps_connection: bool = True


EXAMPLE_SERVERS = {
    "echo_server": Example("echo_server.py", ("0",), b"\x00\x00\x00\x02hi", b"\x00\x00\x00\x02hi"),
    "redis_server": Example("redis_server.py", ("--port", "0"), b"PING\r\n", b"+PONG\r\n"),
    "http_server": Example(
        "http_server.py",
        ("--port", "0"),
        b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 ",
        keeps_connection=False,
    ),
    # Over TCP: a 2-byte length, then the DNS message (its id and flags first).
    "dns_server": Example("dns_server.py", ("0",), _DNS_QUERY, _DNS_REPLY),
}


def _environment() -> dict[str, str]:
    paths = [TRIOCOMM_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> bytes:
    while b"\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"the server ended its output before a whole line: {buffer!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


async def _read_at_least(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", list(EXAMPLE_SERVERS))
async def test_example_server_announces_itself_and_stops_on_signal(
    name: str, signum: signal.Signals, tmp_path: Path
) -> None:
    example = EXAMPLE_SERVERS[name]
    stderr_path = tmp_path / "stderr.txt"
    with trio.fail_after(HANG_GUARD), stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(EXAMPLES / example.script), *example.args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=tmp_path,
            env=_environment(),
        )
        try:
            assert process.stdout is not None
            buffer = bytearray()
            line = (await _read_line(process.stdout, buffer)).decode()
            prefix = f"{Path(example.script).stem}: listening on 127.0.0.1:"
            assert line.startswith(prefix), line
            port = int(line.removeprefix(prefix))
            assert port > 0

            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.send_all(example.request)
            reply = await _read_at_least(client, len(example.reply_starts))
            assert reply.startswith(example.reply_starts), reply
            if not example.keeps_connection:
                await client.aclose()

            # The connection stays open (idle, between requests) for the
            # shutdown to close.
            process.send_signal(signum)
            status = await process.wait()
            rest = buffer + await _read_at_least(process.stdout, 1 << 20)
            if example.keeps_connection:
                assert await _read_at_least(client, 1) == b""  # closed by the server
                await client.aclose()
        finally:
            # Shielded: after the hang guard fires, the cleanup must still run.
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
    errors = stderr_path.read_text()
    assert status == 0, errors
    assert "Traceback" not in errors
    assert f"{signum.name} received, shutting down" in rest.decode()
