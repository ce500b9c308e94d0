"""Fixtures for the example tests: importing the examples, external programs.

The examples are standalone scripts (``python examples/redis_server.py``), so
the folder that holds them goes on ``sys.path`` and tests import them by
their file names (``import resp``).

Tests that drive a program we did not write (redis-server, redis-cli,
redis-benchmark, curl) are marked ``@pytest.mark.needs_binary("name")``, and
fixtures that start such a program call :func:`require_binary`
(``tests/binaries.py``; the mark's hook is in ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from binaries import require_binary

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

REDIS_PASSWORD = "triocomm-test-password"


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (never Redis's 6379)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_listening(port: int, *, attempts: int = 200, pause: float = 0.025) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port (bounded)."""
    for _ in range(attempts):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(pause)
            continue
        await stream.aclose()
        return
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {attempts * pause:g}s")


class RedisServer:
    """A private redis-server on a free loopback port, with a password.

    It saves nothing to disk (``--save '' --appendonly no``) and runs in the
    test's temporary folder. :meth:`stop` and :meth:`start` let a test restart
    it on the same port; the fixture stops it by its PID in any case.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.password = REDIS_PASSWORD
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def options(self, log: Path) -> list[str]:
        """The command line: loopback only, no persistence, a password."""
        return [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--requirepass", self.password,
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(log),
        ]  # fmt: skip

    async def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        self.process = subprocess.Popen(
            [self.binary, *self.options(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await wait_until_listening(self.port)
        except BaseException:
            self.kill()
            raise

    async def stop(self) -> None:
        """Terminate the server (SIGTERM to its PID) and wait until it has exited."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        for _ in range(400):
            if process.poll() is not None:
                return
            await trio.sleep(0.025)
        process.kill()
        process.wait(timeout=5)

    def kill(self) -> None:
        """Stop at once, without awaiting (for teardown paths)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A running, password-protected redis-server of our own; stopped afterwards."""
    server = RedisServer(require_binary("redis-server"), tmp_path)
    await server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    """A 5 MiB file of pseudo-random bytes (several MiB, as the HTTP proof asks)."""
    path = tmp_path / "blob.bin"
    seed = b"triocomm"
    block = bytearray()
    # Deterministic and incompressible: a hash chain, varied per 64 KiB block.
    digest = hashlib.sha256(seed).digest()
    while len(block) < 64 * 1024:
        digest = hashlib.sha256(digest).digest()
        block += digest
    with path.open("wb") as f:
        for i in range(80):
            f.write(bytes([i]) + bytes(block[1:]))
    return path
