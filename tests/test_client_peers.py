"""Scripted raw-Trio servers for the client tests, and tests of the scripts themselves.

The client is tested against these plain Trio servers, never against
triocomm's own server, so that each side is proven on its own. A script is an
``async def script(peer)`` run once per accepted connection; ``Peer`` reads
and writes ``LengthPrefixed`` frames by hand.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

HEADER = struct.Struct("!I")


def frame(payload: bytes) -> bytes:
    """``payload`` as a LengthPrefixed frame (4-byte big-endian length)."""
    return HEADER.pack(len(payload)) + payload


class Peer:
    """The server's end of one accepted connection."""

    def __init__(self, stream: trio.abc.Stream, number: int) -> None:
        self.stream = stream
        self.number = number  # 1 for the first connection the server accepted
        self._buffer = bytearray()
        self.eof = False

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            return False
        self._buffer += data
        return True

    async def read_frame(self) -> bytes | None:
        """The next frame's payload, or None at EOF."""
        while True:
            if len(self._buffer) >= HEADER.size:
                (size,) = HEADER.unpack_from(self._buffer)
                if len(self._buffer) >= HEADER.size + size:
                    payload = bytes(self._buffer[HEADER.size : HEADER.size + size])
                    del self._buffer[: HEADER.size + size]
                    return payload
            if not await self._fill():
                return None

    async def wait_eof(self) -> None:
        """Read (and drop) until the client closes."""
        while await self._fill():
            pass

    async def send_frame(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


Script = Callable[[Peer], Awaitable[object]]


async def echo(peer: Peer) -> None:
    """Reply to every frame with the same payload."""
    while (payload := await peer.read_frame()) is not None:
        await peer.send_frame(payload)


class ScriptedServer:
    """A running scripted server: where it listens and what it saw."""

    def __init__(self) -> None:
        self.port = 0
        self.host = "127.0.0.1"
        self.path: str | None = None
        self.peers: list[Peer] = []
        self.requests: list[bytes] = []  # filled by scripts that want to count
        self.closed = 0  # connections whose script has finished

    @property
    def accepted(self) -> int:
        return len(self.peers)


@asynccontextmanager
async def scripted_server(
    script: Script,
    *,
    host: str = "127.0.0.1",
    path: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[ScriptedServer]:
    """Serve ``script`` on a loopback port (or the Unix socket ``path``)."""
    server = ScriptedServer()

    async def handle(stream: trio.abc.Stream) -> None:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True)
        peer = Peer(stream, len(server.peers) + 1)
        server.peers.append(peer)
        try:
            await script(peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            server.closed += 1  # counted once the socket really is closed

    if path is not None:
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    if path is not None:
        await sock.bind(path)
        server.path = path
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, 0))
        server.port = sock.getsockname()[1]
        server.host = host
    sock.listen(64)
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, [listener])
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
    if path is not None and os.path.exists(path):
        os.unlink(path)


def open_fds() -> int:
    """How many file descriptors this process has open (Linux)."""
    return len(os.listdir("/proc/self/fd"))


# -- the scripts work --------------------------------------------------------


async def test_frame_roundtrip_over_the_scripted_server() -> None:
    async with scripted_server(echo) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(frame(b"ab") + frame(b""))
            client = Peer(stream, 0)
            assert await client.read_frame() == b"ab"
            assert await client.read_frame() == b""
        assert server.accepted == 1
