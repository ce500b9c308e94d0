"""Behind a real HAProxy: the PROXY protocol, admission and a server going away.

HAProxy (TCP mode, started by the test on loopback ports) balances over two
triocomm services, sending the PROXY header v1 (``send-proxy``) to one and v2
(``send-proxy-v2``) to the other, and checks their health itself with the
header too (``check-send-proxy``). The clients connect from their own
loopback addresses (127.0.0.5, 127.0.0.6), so the services can tell the
client's address from HAProxy's.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Server

pytestmark = pytest.mark.needs_binary("haproxy")

LOOPBACK = "127.0.0.1"
CLIENT = "127.0.0.5"
DENIED = "127.0.0.6"

CONFIG = """
global
    maxconn 200
defaults
    mode tcp
    timeout connect 500ms
    timeout client 30s
    timeout server 30s
    timeout check 2s
    retries 3
    option redispatch 1
frontend front
    bind {host}:{port}
    default_backend services
backend services
    balance roundrobin
    server v1 {host}:{port_a} send-proxy check check-send-proxy inter 100ms fall 1 rise 1
    server v2 {host}:{port_b} send-proxy-v2 check check-send-proxy inter 100ms fall 1 rise 1
"""


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """One triocomm service behind HAProxy, and what its handler saw."""

    def __init__(self, name: str, slow_started: trio.MemorySendChannel[str]) -> None:
        self.name = name
        self.slow_started = slow_started
        self.seen: list[tuple[object, object]] = []
        self.release = trio.Event()
        self.server: Server | None = None

    async def handler(self, request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        self.seen.append((conn.remote_address, conn.proxied_by))
        if request == b"slow":
            self.slow_started.send_nowait(self.name)
            await self.release.wait()
        return self.name.encode() + b" " + request


async def request(payload: bytes, port: int, source: str = CLIENT) -> tuple[bytes | None, Any]:
    """A request on a new connection from ``source``: the reply (None if closed), our address."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((LOOPBACK, port))
    stream = trio.SocketStream(sock)
    async with stream:
        me = sock.getsockname()
        await stream.send_all(frame(payload))
        data = b""
        with trio.fail_after(30):
            while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    return None, me
                data += chunk
    return data[4:], me


@asynccontextmanager
async def haproxy(port: int, port_a: int, port_b: int) -> AsyncIterator[None]:
    directory = tempfile.mkdtemp(prefix="tc-haproxy-")
    config = os.path.join(directory, "haproxy.cfg")
    with open(config, "w") as f:
        f.write(CONFIG.format(host=LOOPBACK, port=port, port_a=port_a, port_b=port_b))
    process = await trio.lowlevel.open_process(
        ["haproxy", "-db", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(10):
            while True:  # bounded by the deadline: until HAProxy listens
                try:
                    probe = await trio.open_tcp_stream(LOOPBACK, port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await probe.aclose()
                break
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.unlink(config)
        os.rmdir(directory)


async def test_behind_haproxy() -> None:
    slow_started, slow_seen = trio.open_memory_channel[str](10)
    a, b = Service("a", slow_started), Service("b", slow_started)
    port = free_port()
    async with trio.open_nursery() as nursery:
        for service in (a, b):
            service.server = await nursery.start(
                partial(
                    triocomm.serve,
                    service.handler,
                    0,
                    host=LOOPBACK,
                    codec=LengthPrefixed(),
                    proxy_protocol=True,
                    deny=[DENIED],
                )
            )
        assert a.server is not None
        assert b.server is not None
        async with haproxy(port, a.server.port, b.server.port):
            await _check_addresses(a, b, port)
            await _check_deny(a, b, port)
            await _check_stopping_one(a, b, port, nursery, slow_seen)
        nursery.cancel_scope.cancel()


async def _check_addresses(a: Service, b: Service, port: int) -> None:
    # Until both services answered (round robin, health checks passed): bounded.
    replies: dict[bytes, Any] = {}
    for n in range(50):
        reply, me = await request(b"%d" % n, port)
        assert reply is not None
        replies[reply.split()[0]] = me
        if len(replies) == 2:
            break
    assert set(replies) == {b"a", b"b"}
    for service in (a, b):
        remote, proxied_by = service.seen[-1]
        assert remote == replies[service.name.encode()]  # the client, port and all
        assert isinstance(proxied_by, tuple)
        assert proxied_by[0] == LOOPBACK  # HAProxy's side of its connection
        assert proxied_by[1] != remote[1]  # type: ignore[index]


async def _check_deny(a: Service, b: Service, port: int) -> None:
    before = len(a.seen) + len(b.seen)
    for _ in range(2):  # one to each service (round robin)
        reply, _me = await request(b"no", port, source=DENIED)
        assert reply is None
    assert len(a.seen) + len(b.seen) == before
    assert a.server is not None
    assert b.server is not None
    denied = a.server.stats.errors["denied"] + b.server.stats.errors["denied"]
    assert denied == 2


async def _check_stopping_one(
    a: Service,
    b: Service,
    port: int,
    nursery: trio.Nursery,
    slow_seen: trio.MemoryReceiveChannel[str],
) -> None:
    """Stop service a with a request in flight: every request gets its reply."""
    slow_replies: list[bytes | None] = []

    async def slow() -> None:
        slow_replies.append((await request(b"slow", port))[0])

    holding: set[str] = set()
    started = 0
    with trio.fail_after(30):
        while holding != {"a", "b"} and started < 10:  # until each holds a slow request
            nursery.start_soon(slow)
            started += 1
            holding.add(await slow_seen.receive())
    assert holding == {"a", "b"}
    assert a.server is not None
    stopped = trio.Event()

    async def stop_a() -> None:
        assert a.server is not None
        await a.server.shutdown(grace=None)
        stopped.set()

    nursery.start_soon(stop_a)
    # Once a has closed its listener (what shutdown does first): a connection
    # HAProxy made to a before that would be a's to answer, not b's.
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(LOOPBACK, a.server.port)
    answered_by_a = len(a.seen)
    # a no longer accepts: HAProxy routes every new connection to b.
    replies = [(await request(b"after %d" % n, port))[0] for n in range(20)]
    assert replies == [b"b after %d" % n for n in range(20)]
    assert len(a.seen) == answered_by_a
    a.release.set()
    b.release.set()
    with trio.fail_after(30):
        await stopped.wait()
        while len(slow_replies) < started:
            await trio.sleep(0.01)
    # Each was answered, the one in flight on the stopping service too.
    assert sorted(set(slow_replies)) == [b"a slow", b"b slow"]
