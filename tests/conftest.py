"""Shared fixtures: TLS material from trustme, pairs of connected streams, programs.

``stream_pair`` hands a test both ends of a real connection of a given kind
(memory, lockstep memory, TCP over IPv4 or IPv6 loopback, Unix socket, TLS over
TCP) and closes whatever it opened when the test ends, so a test can be
parametrized over ``STREAM_KINDS`` and run the same code on every transport.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio
import trio.testing
import trustme

from binaries import require_binary

#: Every kind of stream ``stream_pair`` can make.
STREAM_KINDS = ("memory", "lockstep", "tcp", "tcp6", "unix", "tls")
#: The kinds backed by a real socket.
SOCKET_KINDS = ("tcp", "tcp6", "unix", "tls")

StreamPair = tuple[trio.abc.Stream, trio.abc.Stream]
MakeStreamPair = Callable[[str], Awaitable[StreamPair]]


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = _ipv6_loopback_works()


@pytest.fixture(autouse=True)
def _needed_binaries(request: pytest.FixtureRequest) -> None:
    """Honour ``@pytest.mark.needs_binary("curl")``: skip, or fail on CI, without it."""
    for marker in request.node.iter_markers("needs_binary"):
        require_binary(marker.args[0])


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for localhost, 127.0.0.1 and ::1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_ssl_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``tls_ca``."""
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short temporary directory: Unix socket paths must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="tc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def _socket_pair(
    family: socket.AddressFamily, address: object
) -> tuple[trio.SocketStream, trio.SocketStream]:
    """Connect a client socket to a one-shot listener and accept it."""
    listener = trio.socket.socket(family, socket.SOCK_STREAM)
    client = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await listener.bind(address)
        listener.listen(1)
        # The kernel completes the handshake from its backlog, so connect
        # returns before accept is called.
        await client.connect(listener.getsockname())
        accepted, _ = await listener.accept()
    except BaseException:
        client.close()
        raise
    finally:
        listener.close()
    return trio.SocketStream(client), trio.SocketStream(accepted)


@pytest.fixture
async def stream_pair(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context: ssl.SSLContext,
    short_tmp: str,
) -> AsyncIterator[MakeStreamPair]:
    """``await stream_pair(kind)`` returns ``(client_end, server_end)``.

    Both ends are closed (forcefully) when the test finishes, whatever it did.
    """
    opened: list[trio.abc.Stream] = []

    async def make(kind: str) -> StreamPair:
        pair: StreamPair
        if kind == "memory":
            pair = trio.testing.memory_stream_pair()
        elif kind == "lockstep":
            pair = trio.testing.lockstep_stream_pair()
        elif kind == "tcp":
            pair = await _socket_pair(socket.AF_INET, ("127.0.0.1", 0))
        elif kind == "tcp6":
            if not IPV6:
                pytest.skip("no IPv6 loopback on this machine")
            pair = await _socket_pair(socket.AF_INET6, ("::1", 0))
        elif kind == "unix":
            path = os.path.join(short_tmp, f"s{len(opened)}.sock")
            pair = await _socket_pair(socket.AF_UNIX, path)
        elif kind == "tls":
            raw_client, raw_server = await _socket_pair(socket.AF_INET, ("127.0.0.1", 0))
            client = trio.SSLStream(raw_client, client_ssl_context, server_hostname="localhost")
            server = trio.SSLStream(raw_server, server_ssl_context, server_side=True)
            opened.extend((client, server))
            # Handshake now, both sides at once, so tests may send and then
            # receive from a single task.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                nursery.start_soon(server.do_handshake)
            return client, server
        else:
            raise ValueError(f"unknown stream kind {kind!r}")
        opened.extend(pair)
        return pair

    yield make
    for stream in opened:
        await trio.aclose_forcefully(stream)


class CountingStream(trio.abc.Stream):
    """Wraps an accepted stream and records the size of every write."""

    def __init__(self, inner: trio.abc.Stream, writes: list[int]) -> None:
        self.inner = inner
        self.writes = writes

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(memoryview(data).nbytes)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of a server's writes: every accepted stream is a CountingStream."""
    sizes: list[int] = []
    accept = trio.SocketListener.accept

    async def counting_accept(self: trio.SocketListener) -> trio.abc.Stream:
        return CountingStream(await accept(self), sizes)

    monkeypatch.setattr(trio.SocketListener, "accept", counting_accept)
    return sizes
