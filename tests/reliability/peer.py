"""A raw peer for the stress suite: a plain socket, optionally speaking TLS through memory BIOs.

Not triocomm, and not a Trio stream either: the peer must be able to put
bytes on the wire *synchronously* (:meth:`RawPeer.send_now`), so that a test
can send a message and move the clock in one scheduler step, making the
message's arrival and a deadline's expiry land in the same round. A
:class:`trio.SSLStream` cannot do that (its sends always yield), so TLS is
spoken with :class:`ssl.SSLObject` over memory BIOs and the same socket.
"""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import termios
from typing import Any

import trio

READ_SIZE = 256 * 1024
# struct tcp_info starts with the connection's state.
TCP_ESTABLISHED = 1
TCP_CLOSE = 7  # what a reset leaves


def queued(sock: Any) -> tuple[int, int]:
    """Bytes in ``sock``'s receive queue, and in its send queue (sent but unacknowledged too)."""
    fd = sock.fileno()
    (received,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, bytes(4)))
    (unacknowledged,) = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(4)))
    return received, unacknowledged


def in_flight(one: Any, other: Any) -> bool:
    """Whether the kernel still owes a transfer between two ends of one loopback connection.

    Owed: bytes one end holds unacknowledged while the other has nothing
    left to read (they are on their way, or a window update or an
    acknowledgement is); once an end is closed (``fileno()`` -1) or reset,
    the FIN or RST an established end has not seen yet, or what a live end
    still holds unacknowledged (the closed end acknowledges or resets it).
    Bytes waiting in a receive queue are not owed: they wait for the
    application.
    """
    live = []
    for end in (one, other):
        if end.fileno() >= 0:
            state = end.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            if state != TCP_CLOSE:
                live.append((end, state))
    if len(live) == 2:
        (in_one, out_one), (in_other, out_other) = queued(one), queued(other)
        return (out_one > 0 and in_other == 0) or (out_other > 0 and in_one == 0)
    for end, state in live:
        received, unacknowledged = queued(end)
        if unacknowledged > 0 or (received == 0 and state == TCP_ESTABLISHED):
            return True
    return False


class RawPeer:
    """One loopback connection to a service, plain or TLS, read and written directly."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject | None) -> None:
        self.sock = sock
        self.tls = tls
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._unsent = bytearray()

    @classmethod
    async def connect(
        cls, port: int, ssl_context: ssl.SSLContext | None, rcvbuf: int = 8192
    ) -> RawPeer:
        """Connect (and shake hands); ``rcvbuf`` keeps the window small."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            # No Nagle: a small segment held back for an acknowledgement is a
            # real-time delay, and the mock clock would jump past limits
            # while every task waits for it.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
            peer = cls(sock, None)
            if ssl_context is not None:
                await peer._handshake(ssl_context)
        except BaseException:
            sock.close()
            raise
        return peer

    async def _handshake(self, context: ssl.SSLContext) -> None:
        tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("EOF during the TLS handshake") from None
        self.tls = tls
        await self._flush()

    def close(self) -> None:
        self.sock.close()

    # -- sending ---------------------------------------------------------------

    def send_now(self, data: bytes) -> bool:
        """Put ``data`` on the wire without yielding; False if part of it must wait.

        What must wait goes out with the next :meth:`send`.
        """
        if self.tls is not None:
            self.tls.write(data)
            self._unsent += self._outgoing.read()
        else:
            self._unsent += data
        while self._unsent:
            try:
                sent = self.sock.send(self._unsent)
            except BlockingIOError:
                return False
            del self._unsent[:sent]
        return True

    async def send(self, data: bytes) -> None:
        """Send ``data``, waiting for room when the kernel's buffers are full."""
        if not self.send_now(data):
            await self._flush()
        await trio.lowlevel.checkpoint()

    async def _flush(self) -> None:
        self._unsent += self._outgoing.read()
        while self._unsent:
            try:
                sent = self.sock.send(self._unsent)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
                continue
            del self._unsent[:sent]

    # -- receiving -------------------------------------------------------------

    async def _fill(self) -> bool:
        """Read once from the socket into the TLS layer; False at the end of the stream."""
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def recv(self, limit: int = READ_SIZE) -> bytes:
        """Up to ``limit`` bytes; b"" at the end, ``ConnectionResetError`` on a reset."""
        if self.tls is None:
            while True:
                try:
                    return self.sock.recv(limit)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.sock)
        while True:
            try:
                data = self.tls.read(limit)
            except ssl.SSLWantReadError:
                if not await self._fill():
                    return b""  # closed without close_notify: still the end
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS error: {exc}") from exc
            await self._flush()  # answers to post-handshake messages, if any
            return data
