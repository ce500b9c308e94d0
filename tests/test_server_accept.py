"""Accept errors never stop a service: out of file descriptors, it backs off and retries.

The service runs in a child process whose RLIMIT_NOFILE is lowered to leave
room for only a few connections, so the test can exhaust it without touching
the limits of the test process itself.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile

import pytest
import trio

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is POSIX")

CHILD = r"""
import logging, os, resource, sys
from functools import partial
import trio, triocomm

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s %(message)s")
ROOM = 3

async def main(port_file):
    stop = trio.Event()

    async def handler(request, conn):
        if request == b"stop":
            stop.set()
        return request

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(
            triocomm.serve, handler, 0, host="127.0.0.1", codec=triocomm.LengthPrefixed()))
        in_use = len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own fd
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + ROOM, hard))
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.port))
        os.rename(port_file + ".tmp", port_file)
        await stop.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print("accept errors:", server.stats.errors["accept"], flush=True)
        await server.shutdown(grace=5)

trio.run(main, sys.argv[1])
"""


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


async def request(stream: trio.SocketStream, payload: bytes) -> bytes:
    await stream.send_all(frame(payload))
    return await reply(stream)


async def reply(stream: trio.SocketStream) -> bytes:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError("the service closed the connection")
        data += chunk
    return data[4:]


async def test_out_of_file_descriptors_the_service_waits_and_recovers() -> None:
    directory = tempfile.mkdtemp(prefix="tc-accept-")
    port_file = os.path.join(directory, "port")
    result: list[subprocess.CompletedProcess[bytes]] = []

    async def run_child() -> None:
        result.append(
            await trio.run_process(
                [sys.executable, "-c", CHILD, port_file],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_child)
            while not os.path.exists(port_file):
                assert not result, result[0].stderr.decode()
                await trio.sleep(0.05)
            with open(port_file) as f:
                port = int(f.read())
            # Three connections fill the room the child has; two more wait in
            # the listen backlog because every accept fails with EMFILE.
            clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
            for i, client in enumerate(clients[:3]):
                assert await request(client, b"early %d" % i) == b"early %d" % i
            for client in clients[3:]:
                await client.send_all(frame(b"late"))
            with trio.move_on_after(0.5):
                await reply(clients[3])
                raise AssertionError("a connection was accepted beyond the fd limit")
            # Closing two connections gives two descriptors back: the service
            # must pick up the waiting clients by itself.
            for client in clients[:2]:
                await client.aclose()
            for client in clients[3:]:
                assert await reply(client) == b"late"
            assert await request(clients[2], b"stop") == b"stop"
            for client in clients[2:]:
                await client.aclose()
    os.unlink(port_file)
    os.rmdir(directory)
    (child,) = result
    log = child.stderr.decode()
    assert child.returncode == 0, log
    errors = int(child.stdout.decode().split("accept errors:")[1])
    assert errors >= 1
    assert "Too many open files" in log
    # One line when an episode starts and one when it ends, not one per retry
    # (the service waited 0.5 s, about five retries, in the first episode).
    episodes = log.count("retrying every 0.1s")
    assert 1 <= episodes < errors
    # An episode ends with the next successful accept (the last may not have one).
    assert 1 <= log.count("works again") <= episodes
