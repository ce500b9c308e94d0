"""The Connection: one Trio stream, one codec, its state and its statistics.

A :class:`Connection` is a :class:`trio.abc.Channel` of messages. It is the
one place where bytes meet messages: the client's sessions and the server's
passive sessions are thin loops around it. It knows nothing of pools or
services; those layers set its state and its per-phase limits.

Concurrency: sends from several tasks are serialized (each message goes out
whole, in FIFO order of the callers), so a server may push from several tasks;
two tasks receiving at once is a bug and raises :class:`trio.BusyResourceError`.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar, Union

import trio

from ._errors import CommError, CommTimeout, ConnectionLost, ProtocolError
from ._timeouts import _Limits

if TYPE_CHECKING:
    from ._framing import Codec
    from ._watchdog import Watchdog

__all__ = ["ConnState", "Connection", "ConnectionStats", "Idle", "format_address"]

In = TypeVar("In")
# Contravariant: a connection only accepts outgoing messages, so one that can
# send any bytes-like object is usable where one sending bytes is expected
# (a handler typed ``Connection[bytes, bytes]`` accepts the built-in codecs'
# ``Connection[bytes, bytes | bytearray | memoryview]``).
Out = TypeVar("Out", contravariant=True)

_ids = itertools.count(1)
# Opens and closes are logged at DEBUG, as MINA's LoggingFilter does
# (`triocomm serve -v` shows them).
logger = logging.getLogger("triocomm.connection")
_INF = math.inf
# Reads ask the stream for at most this much at once.
RECEIVE_SIZE = 64 * 1024
# With an inactivity limit, large writes go out in pieces of this size so that
# the limit measures progress, not the time to write the whole message.
_WRITE_STEP = 256 * 1024
_FILE_CHUNK = 256 * 1024
# Waits for a peer to begin a message that the inactivity limit does not cover.
_QUIET_PHASES = frozenset({"first_request", "keepalive"})


class ConnState(enum.Enum):
    """Where a connection is in its life (Workflow's states, plus the end).

    Client: ``CONNECTING → CONNECTED → (RECEIVING → SUCCESS → IDLE)* →
    CLOSING → CLOSED``. Server: ``CONNECTED → (RECEIVING → KEEPALIVE)* →
    CLOSING → CLOSED``, ``RECEIVING`` lasting until the replies are written
    (a server connection is never seen in ``SUCCESS``: the round that wrote
    the replies moves on to ``KEEPALIVE`` before any other task runs). Any
    failure leads to ``ERROR``, which is final like ``CLOSED``.
    """

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECEIVING = "receiving"
    SUCCESS = "success"
    IDLE = "idle"
    KEEPALIVE = "keepalive"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"


class Idle(enum.Enum):
    """Which direction has been quiet (MINA's idle statuses)."""

    READ = "read"
    WRITE = "write"
    BOTH = "both"


@dataclass(slots=True)
class ConnectionStats:
    """I/O statistics of one connection. Times are on the Trio clock.

    ``messages_sent`` counts encoded messages; bytes sent with
    :meth:`Connection.send_file` count in ``bytes_sent`` only.
    """

    created_at: float
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    last_send_at: float | None = None
    last_receive_at: float | None = None


def format_address(address: object) -> str:
    """Render a socket address for messages and logs: ``host:port``,
    ``[v6]:port`` or a Unix path."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        if isinstance(host, str) and ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    if isinstance(address, bytes):
        address = address.decode(errors="replace")
    if isinstance(address, str):
        return address or "unix socket"
    return "unknown peer" if address is None else str(address)


# Plain sockets are read and written with os.read / os.write on their file
# descriptor; Windows sockets are not file descriptors.
_DIRECT_IO = sys.platform != "win32"
# What trio's SocketStream reports as "closed by us" rather than "broken".
_CLOSED_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """The stream error SocketStream would raise for a failed socket call."""
    if exc.errno in _CLOSED_ERRNOS:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


_NO_LIMITS = _Limits()
# The pending messages of every connection with nothing pending: never
# mutated (a read that leaves messages pending replaces it with its own list).
_NO_PENDING: list[Any] = []

FileArg = Union[str, "os.PathLike[str]", IO[bytes]]


class Connection(trio.abc.Channel[Any], Generic[In, Out]):
    """A message channel over any :class:`trio.abc.Stream`.

    Args:
        stream: TCP, TLS, Unix or memory stream; the connection owns it and
            closes it.
        codec: how messages are encoded and decoded.

    ``send`` returns once the bytes are handed to the stream (backpressure).
    ``receive`` raises :class:`trio.EndOfChannel` when the peer closed cleanly
    between messages and :class:`ConnectionLost` when it went away in the middle
    of one. Bad input raises :class:`FrameTooLarge` / :class:`ProtocolError`;
    the connection then moves to ``ERROR`` and is closed. A send that is
    cancelled or times out also breaks the connection, since part of a message
    may already be on the wire.

    ``receive`` returns a message already decoded from an earlier read without
    a schedule point (it still raises :class:`trio.Cancelled` if cancelled), so
    a pipelined burst is consumed without a task switch per message.
    """

    # Bad input found after good messages in the same read: raised by the
    # receive that follows them. A class default, so it costs idle connections
    # nothing.
    _deferred_error: ProtocolError | None = None
    # The client's or server's Watchdog, which times the waits of this
    # connection's reads (see _watchdog.py); None: a cancel scope per wait.
    # Class defaults, so a connection pays memory only for what it uses.
    _watchdog: Watchdog | None = None
    _wait_deadline: float = _INF  # the deadline of the read waiting now
    _wd_at: float = _INF  # when the watchdog looks at this connection next
    _wd_seq: int = -1
    _expired = False  # set by the watchdog: the waiting read timed out
    # False only while the client or server calls receive() from a loop that
    # has a schedule point of its own in every round (see _server.py and
    # _client.py): a read that finds data then returns without one.
    _yield_on_data = True
    # Called when a read must wait for data (the socket had none), before it
    # waits: the server sets it to its entry's went_quiet, so that a
    # connection between two requests becomes evictable only once it is idle.
    _on_wait: Callable[[], None] | None = None

    def __init__(self, stream: trio.abc.Stream, codec: Codec[In, Out]) -> None:
        self._stream = stream
        self._codec = codec
        self._encode = codec.encode
        self._decoder = codec.decoder()
        # Messages decoded but not yet received, last first (so that taking
        # one is list.pop()): the decoder's own list, reversed in place, or
        # the shared empty one, so an idle connection carries none.
        self._pending: list[In] = _NO_PENDING
        self._id = next(_ids)
        self._sessions = 0
        self._state = ConnState.CONNECTED
        self._stats = ConnectionStats(created_at=trio.current_time())
        self._context: dict[Any, Any] | None = None  # made on first use
        self._limits = _NO_LIMITS
        self._eof = False
        self._closed = False
        self._receiving = False
        self._sending = False
        # Made on the first contended send (most connections never have one).
        self._send_queue: trio.lowlevel.ParkingLot | None = None
        # A plain TCP or Unix socket is read and written directly (see
        # _read_socket and _write_socket), skipping SocketStream's layers.
        self._sock = stream.socket if _DIRECT_IO and type(stream) is trio.SocketStream else None
        # The run's clock, bound once: cheaper than trio.current_time() on
        # every read and write, and still the MockClock under test.
        self._now = trio.lowlevel.current_clock().current_time
        sock = _socket_of(stream)
        self._local: object = None
        self._remote: object = None
        if sock is not None:
            try:
                self._local = sock.getsockname()
                self._remote = sock.getpeername()
            except OSError:
                pass
        self._peer = format_address(self._remote) if sock is not None else "memory stream"
        logger.debug("connection #%d with %s opened", self._id, self._peer)

    # -- properties ----------------------------------------------------------

    @property
    def id(self) -> int:
        """A process-unique number for this connection."""
        return self._id

    @property
    def seq(self) -> int:
        """Sessions started on this connection before the current one (0 in the first)."""
        return self._sessions - 1 if self._sessions else 0

    @property
    def state(self) -> ConnState:
        """The current :class:`ConnState`."""
        return self._state

    @property
    def stats(self) -> ConnectionStats:
        """Live :class:`ConnectionStats` of this connection."""
        return self._stats

    @property
    def context(self) -> dict[Any, Any]:
        """A dict for the user's own per-connection data."""
        if self._context is None:
            self._context = {}
        return self._context

    @property
    def codec(self) -> Codec[In, Out]:
        """The codec this connection speaks."""
        return self._codec

    @property
    def stream(self) -> trio.abc.Stream:
        """The underlying stream (use with care: bypassing the connection desynchronises it)."""
        return self._stream

    @property
    def local_address(self) -> object:
        """The local socket address, or ``None`` for a non-socket stream."""
        return self._local

    @property
    def remote_address(self) -> object:
        """The peer's socket address, or ``None`` for a non-socket stream."""
        return self._remote

    @property
    def peer(self) -> str:
        """The peer's address as text, for messages and logs."""
        return self._peer

    @property
    def is_secure(self) -> bool:
        """True when the stream is TLS."""
        return isinstance(self._stream, trio.SSLStream)

    @property
    def is_closed(self) -> bool:
        """True once the connection is closed (``CLOSED`` or ``ERROR``)."""
        return self._closed

    def idle_time(self, status: Idle = Idle.BOTH) -> float:
        """Seconds since the last read (``READ``), write (``WRITE``) or either (``BOTH``).

        Counts from creation when nothing was read or written yet. While a write
        is in progress the connection is not write-idle, however slow the
        peer reads.
        """
        now = trio.current_time()
        stats = self._stats
        last_read = stats.last_receive_at or stats.created_at
        last_write = now if self._sending else (stats.last_send_at or stats.created_at)
        if status is Idle.READ:
            return now - last_read
        if status is Idle.WRITE:
            return now - last_write
        return now - max(last_read, last_write)

    def __repr__(self) -> str:
        return f"<Connection #{self._id} {self._peer} {self._state.name}>"

    # -- sending -------------------------------------------------------------

    async def send(self, value: Out) -> None:
        """Encode and send one message; return when its bytes are handed to the stream.

        Raises:
            TypeError: the codec cannot encode ``value`` (the connection is
                unaffected).
            trio.ClosedResourceError: the connection was closed by us.
            ConnectionLost: the peer reset the connection.
            CommTimeout: the ``send`` or ``inactivity`` limit ran out.
        """
        data = self._encode(value)
        await self._write(data, 1)

    async def send_many(self, values: Iterable[Out]) -> None:
        """Encode several messages and send them in one write.

        Every message is encoded before anything is written: a message the
        codec refuses raises :class:`TypeError` (or the codec's error) and
        none of them is sent.
        """
        if type(values) is not list:
            values = list(values)
        count = len(values)
        if not count:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            await trio.lowlevel.checkpoint()
            return
        await self._write(self._encode_many(values), count)

    def _encode_many(self, values: list[Out]) -> Any:
        """The bytes of one or more messages (the server's loop calls it directly)."""
        if len(values) == 1:
            return self._encode(values[0])
        # The codec's optional batch encoder: one call for the batch (looked
        # up here, not stored: a connection attribute costs every idle
        # connection memory).
        encode_batch = getattr(self._codec, "encode_batch", None)
        if encode_batch is not None:
            return encode_batch(values)
        encode = self._encode
        return b"".join([encode(v) for v in values])

    async def _acquire_send(self) -> None:
        if self._sending:
            # The releasing task hands ownership over directly (FIFO), so a
            # woken waiter never races a newcomer.
            if self._send_queue is None:
                self._send_queue = trio.lowlevel.ParkingLot()
            await self._send_queue.park()
        else:
            self._sending = True

    def _release_send(self) -> None:
        if self._send_queue:
            self._send_queue.unpark()
        else:
            self._sending = False

    def _write_nowait(self, data: Any, count: int) -> int:
        """Write ``data`` at once if this is a plain socket, with no checkpoint.

        For a caller that checks for cancellation and yields in its own
        frame (the server's request loop and ``client.request``, each with
        its own copy of the few lines that do so: a shared helper would be
        the coroutine this saves): no coroutine, and one frame fewer to
        pass through at its schedule point. Returns -1 when the
        kernel took all of ``data`` (the write is done and counted);
        otherwise the number of bytes it took, possibly 0 (also when the
        connection is not a plain socket, is closed, or another send is in
        progress, or on an error), and the caller must finish with
        ``_write(data, count, ..., sent)``, which raises what it finds.
        """
        sock = self._sock
        if sock is None or self._sending or self._closed:
            return 0
        try:
            sent = os.write(sock.fileno(), data)
        except OSError:
            return 0  # _write meets the error again and handles it
        if sent < (data.nbytes if isinstance(data, memoryview) else len(data)):
            return sent
        self._count_sent(sent, count)
        return -1

    def _count_sent(self, nbytes: int, count: int) -> None:
        """A write of ``count`` messages, ``nbytes`` bytes in all, is done."""
        stats = self._stats
        stats.bytes_sent += nbytes
        stats.messages_sent += count
        stats.last_send_at = self._now()

    async def _write(
        self, data: Any, count: int, cancel_checked: bool = False, sent: int = 0
    ) -> None:
        # cancel_checked: the caller checks for cancellation once in each of
        # its rounds elsewhere (the server's request loop, at its read), so
        # this write needs only its schedule point. sent: bytes of data that
        # _write_nowait has already written.
        if self._closed:
            raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._sending:
            await self._acquire_send()
        else:
            self._sending = True  # uncontended: no coroutine for _acquire_send
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            try:
                sock = self._sock
                if sock is not None:
                    # SocketStream.send_all's contract without its layers,
                    # inlined: the common case (the kernel takes it all at
                    # once) costs one system call, a cancellation check and a
                    # schedule point, and no cancel scope.
                    if not cancel_checked:
                        await trio.lowlevel.checkpoint_if_cancelled()
                    if not sent:
                        try:
                            sent = os.write(sock.fileno(), data)
                        except BlockingIOError:
                            pass
                        except OSError as exc:
                            raise _stream_error(exc) from exc
                    if sent < size:
                        await self._write_rest(sock, data, sent, size)
                    else:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                elif self._limits.unlimited:
                    await self._stream.send_all(data)
                else:
                    await self._write_limited(data)
            except trio.BrokenResourceError as exc:
                await self._break()
                raise ConnectionLost(f"connection to {self._peer} lost while sending") from exc
            except trio.ClosedResourceError:
                raise
            except BaseException:
                # Timed out or cancelled part-way: the stream may hold half a
                # message, so nothing valid can follow on it.
                await self._break()
                raise
        finally:
            self._release_send()
        self._count_sent(size, count)

    async def _write_rest(
        self, sock: trio.socket.SocketType, data: Any, sent: int, total: int
    ) -> None:
        """Write what the kernel did not take at once (``total`` bytes in all), waiting for room.

        Each wait gets a cancel scope for the send / inactivity limits.
        """
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        send_deadline = self._send_deadline()
        while sent < total:
            deadline, phase, limit = self._write_deadline(send_deadline)
            if deadline == _INF:
                await trio.lowlevel.wait_writable(sock)
            else:
                with trio.CancelScope(deadline=deadline) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    raise CommTimeout(phase, limit or 0.0, self._peer)
            try:
                sent += os.write(sock.fileno(), view[sent:])
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _stream_error(exc) from exc

    def _write_deadline(self, send_deadline: float) -> tuple[float, str, float | None]:
        limits = self._limits
        if limits.inactivity is not None:
            progress = trio.current_time() + limits.inactivity
            if progress < send_deadline:
                return progress, "inactivity", limits.inactivity
        return send_deadline, "send", limits.send

    def _send_deadline(self) -> float:
        send = self._limits.send
        return _INF if send is None else trio.current_time() + send

    async def _write_limited(self, data: Any) -> None:
        send_deadline = self._send_deadline()
        with memoryview(data) as view:
            total = view.nbytes
            step = _WRITE_STEP if self._limits.inactivity is not None else max(total, 1)
            for offset in range(0, max(total, 1), step):
                deadline, phase, limit = self._write_deadline(send_deadline)
                with trio.CancelScope(deadline=deadline) as scope:
                    await self._stream.send_all(view[offset : offset + step])
                if scope.cancelled_caught:
                    raise CommTimeout(phase, limit or 0.0, self._peer)

    # -- sending files -------------------------------------------------------

    async def send_file(self, file: FileArg, offset: int = 0, count: int | None = None) -> int:
        """Send raw bytes of a file, outside the codec, between two messages.

        ``file`` is a path or a binary file object. Sends ``count`` bytes from
        ``offset`` (default: to the end of the file) and returns the number of
        bytes sent. On a plain TCP or Unix socket this is zero-copy
        (:func:`os.sendfile`); over TLS or a memory stream the file is read in
        256 KiB chunks, so memory stays bounded whatever the size.

        Raises:
            ValueError: ``offset``/``count`` lie outside the file.
            CommError: the file ended before ``count`` bytes (the peer was
                promised more; the connection is broken).
            ConnectionLost: the peer went away; the connection is broken.
        """
        if offset < 0 or (count is not None and count < 0):
            raise ValueError("offset and count must be >= 0")
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb") as f:  # noqa: ASYNC230 - opening is not blocking I/O worth a thread
                return await self._send_open_file(f, offset, count)
        return await self._send_open_file(file, offset, count)

    async def _send_open_file(self, f: IO[bytes], offset: int, count: int | None) -> int:
        try:
            fd: int | None = f.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        size = os.fstat(fd).st_size if fd is not None else f.seek(0, os.SEEK_END)
        if offset > size:
            raise ValueError(f"offset {offset} is beyond the end of the file ({size} bytes)")
        if count is None:
            count = size - offset
        elif offset + count > size:
            raise ValueError(f"offset {offset} + count {count} exceed the file size ({size} bytes)")
        if self._closed:
            raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
        await self._acquire_send()
        sent = 0
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            sock = self._stream.socket if isinstance(self._stream, trio.SocketStream) else None
            send_deadline = self._send_deadline()
            try:
                if sock is not None and fd is not None:
                    async for n in self._sendfile(sock, fd, offset, count, send_deadline):
                        sent += n
                else:
                    async for n in self._send_chunks(f, fd, offset, count, send_deadline):
                        sent += n
            except (trio.BrokenResourceError, BrokenPipeError, ConnectionError) as exc:
                await self._break()
                raise ConnectionLost(
                    f"connection to {self._peer} lost while sending a file"
                ) from exc
            except trio.ClosedResourceError:
                raise
            except BaseException:
                await self._break()
                raise
        finally:
            self._release_send()
            self._stats.bytes_sent += sent
            if sent:
                self._stats.last_send_at = trio.current_time()
        return sent

    async def _sendfile(
        self, sock: trio.socket.SocketType, fd: int, offset: int, count: int, send_deadline: float
    ) -> Any:
        sockfd = sock.fileno()
        end = offset + count
        await trio.lowlevel.checkpoint()
        while offset < end:
            try:
                n = os.sendfile(sockfd, fd, offset, min(end - offset, 1 << 30))
            except BlockingIOError:
                deadline, phase, limit = self._write_deadline(send_deadline)
                with trio.CancelScope(deadline=deadline) as scope:
                    await trio.lowlevel.wait_writable(sock)
                if scope.cancelled_caught:
                    raise CommTimeout(phase, limit or 0.0, self._peer) from None
                continue
            if n == 0:
                raise CommError(
                    f"file ended {end - offset} bytes early while sending to {self._peer}"
                )
            offset += n
            yield n

    async def _send_chunks(
        self, f: IO[bytes], fd: int | None, offset: int, count: int, send_deadline: float
    ) -> Any:
        end = offset + count
        if fd is None:
            f.seek(offset)
        if count == 0:
            await trio.lowlevel.checkpoint()
        while offset < end:
            want = min(end - offset, _FILE_CHUNK)
            if fd is not None:
                chunk = await trio.to_thread.run_sync(os.pread, fd, want, offset)
            else:
                chunk = f.read(want)
            if not chunk:
                raise CommError(
                    f"file ended {end - offset} bytes early while sending to {self._peer}"
                )
            deadline, phase, limit = self._write_deadline(send_deadline)
            with trio.CancelScope(deadline=deadline) as scope:
                await self._stream.send_all(chunk)
            if scope.cancelled_caught:
                raise CommTimeout(phase, limit or 0.0, self._peer)
            offset += len(chunk)
            yield len(chunk)

    # -- receiving -----------------------------------------------------------

    async def receive(self) -> In:
        """Return the next message.

        Raises:
            trio.EndOfChannel: the peer closed cleanly between messages.
            ConnectionLost: the peer closed or reset in the middle of a message.
            FrameTooLarge, ProtocolError: bad input; the connection is closed.
                Messages that arrived whole before the bad bytes are returned
                first (the connection is already in ``ERROR`` and will not be
                reused); the receive after them raises.
            CommTimeout: a receive-side limit ran out; the connection is closed.
            trio.ClosedResourceError: the connection was closed by us.
            trio.BusyResourceError: another task is receiving.
        """
        pending = self._pending
        if pending and not self._closed:
            await trio.lowlevel.checkpoint_if_cancelled()
            message = pending.pop()
            if not pending:
                self._pending = _NO_PENDING
            return message
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        self._receiving = True
        # The whole slow path is inlined here rather than in a helper: a
        # connection waiting for its next message holds this coroutine's frame,
        # and one frame less is ~300 bytes less per idle connection.
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            if self._deferred_error is not None:
                error, self._deferred_error = self._deferred_error, None
                await self._break()
                raise error
            if self._eof:
                await trio.lowlevel.checkpoint()
                raise trio.EndOfChannel
            decoder = self._decoder
            limits = self._limits
            unlimited = limits.unlimited
            # When this call began, for the first-byte deadline: read from the
            # clock only when that deadline is needed (bytes left over from an
            # earlier call, or a wait), which is before any schedule point of
            # this call, so it is the call's start to within a system call.
            started = self._now() if not unlimited and decoder.buffered else None
            message_deadline = _INF
            data: bytes | bytearray
            while True:
                try:
                    if not unlimited and decoder.buffered and message_deadline is _INF:
                        # From the message's first byte, but not before this
                        # call: time the application spent elsewhere while
                        # those bytes sat buffered is not the peer's delay.
                        message_deadline = self._receive_deadline(
                            max(self._stats.last_receive_at or 0.0, started or 0.0)
                        )
                    sock = self._sock
                    if sock is not None:
                        # SocketStream.receive_some's contract without its
                        # layers, inlined (no helper frame on the hot path, nor
                        # held by every idle connection): data already there
                        # costs one system call, a cancellation check and a
                        # schedule point, and no deadline arithmetic (data is
                        # progress); a read that must wait is timed by the
                        # watchdog, or by a cancel scope when there is none.
                        await trio.lowlevel.checkpoint_if_cancelled()
                        waited = False
                        while True:
                            try:
                                data = os.read(sock.fileno(), RECEIVE_SIZE)
                                break
                            except BlockingIOError:
                                pass
                            except OSError as exc:
                                raise _stream_error(exc) from exc
                            waited = True
                            if self._on_wait is not None:
                                self._on_wait()
                            if unlimited:
                                await trio.lowlevel.wait_readable(sock)
                                continue
                            if started is None:
                                started = self._now()
                            deadline, phase, limit = self._read_deadline(started, message_deadline)
                            watchdog = self._watchdog
                            if watchdog is not None and watchdog._running:
                                # The watchdog wakes this wait if the deadline
                                # passes: no cancel scope.
                                self._expired = False
                                self._wait_deadline = deadline
                                if deadline < self._wd_at:
                                    watchdog.arm(self, deadline)
                                try:
                                    await trio.lowlevel.wait_readable(sock)
                                except trio.ClosedResourceError:
                                    if self._expired:
                                        raise CommTimeout(phase, limit or 0.0, self._peer) from None
                                    raise
                                finally:
                                    self._wait_deadline = _INF
                            else:
                                with trio.CancelScope(deadline=deadline) as scope:
                                    await trio.lowlevel.wait_readable(sock)
                                if scope.cancelled_caught:
                                    raise CommTimeout(phase, limit or 0.0, self._peer)
                        if not waited:
                            if message_deadline is not _INF and self._now() >= message_deadline:
                                # A message that keeps coming but never ends
                                # still times out.
                                raise CommTimeout("receive", limits.receive or 0.0, self._peer)
                            if self._yield_on_data:
                                await trio.lowlevel.cancel_shielded_checkpoint()
                    else:
                        # Not a plain socket: whether the read will wait is
                        # not known, so it counts as waiting.
                        if self._on_wait is not None:
                            self._on_wait()
                        if unlimited:
                            data = await self._stream.receive_some(RECEIVE_SIZE)
                        else:
                            if started is None:
                                started = self._now()
                            data = await self._read_limited(started, message_deadline)
                except trio.BrokenResourceError as exc:
                    await self._break()
                    raise ConnectionLost(
                        f"connection to {self._peer} lost: {exc or 'reset'}"
                    ) from exc
                except CommTimeout:
                    await self._break()
                    raise
                if not data:
                    self._eof = True
                    if decoder.buffered:
                        await self._break()
                        raise ConnectionLost(
                            f"{self._peer} closed the connection in the middle of a message "
                            f"({decoder.buffered} bytes of it received)"
                        )
                    raise trio.EndOfChannel
                stats = self._stats
                stats.bytes_received += len(data)
                stats.last_receive_at = self._now()
                try:
                    messages = decoder.feed(data)
                except ProtocolError as exc:
                    if not exc.messages:
                        await self._break()
                        raise
                    # Messages that arrived whole before the bad bytes are
                    # handed out first (a server answers them); the error is
                    # raised, and the connection closed, by the receive after
                    # them. The state is ERROR from now on: it is never reused.
                    self._state = ConnState.ERROR
                    self._deferred_error = exc
                    messages = list(exc.messages)
                    exc.messages = ()
                except Exception as exc:
                    # A user codec raising something else still means bad input.
                    await self._break()
                    raise ProtocolError(f"cannot decode data from {self._peer}: {exc!r}") from exc
                if messages:
                    count = len(messages)
                    stats.messages_received += count
                    if count == 1:
                        return messages[0]
                    # Nothing is pending when a read happens: the rest of
                    # the burst becomes the pending list, with no copy (the
                    # decoder hands its list over; see Decoder.feed).
                    if type(messages) is not list:
                        messages = list(messages)
                    messages.reverse()
                    first = messages.pop()
                    self._pending = messages
                    return first
        finally:
            self._receiving = False

    def _take_pending(self, first: In) -> list[In]:
        """Return ``first`` followed by every message already decoded, removing them (no I/O)."""
        items = self._pending
        if not items:
            return [first]
        self._pending = _NO_PENDING
        items.append(first)
        items.reverse()
        return items

    @property
    def pending(self) -> int:
        """Messages already decoded and waiting to be received (no I/O needed)."""
        return len(self._pending)

    def _receive_deadline(self, first_byte_at: float) -> float:
        receive = self._limits.receive
        return _INF if receive is None else first_byte_at + receive

    def _read_deadline(
        self, started: float, message_deadline: float
    ) -> tuple[float, str, float | None]:
        """The deadline of the next read, with the phase and limit that set it."""
        limits = self._limits
        if message_deadline is _INF and not self._decoder.buffered:
            # Waiting for the first byte of a message.
            phase, limit = limits.first_phase, limits.first_timeout
            deadline = _INF if limit is None else started + limit
        else:
            phase, limit, deadline = "receive", limits.receive, message_deadline
        # A peer that has not started its next request is not stalled, only
        # quiet: the first_request / keepalive limit alone bounds that wait,
        # else inactivity (10 s) would silently cut keep-alive (60 s) short.
        if limits.inactivity is not None and phase not in _QUIET_PHASES:
            progress = self._now() + limits.inactivity
            if progress < deadline:
                phase, limit, deadline = "inactivity", limits.inactivity, progress
        return deadline, phase, limit

    async def _read_limited(self, started: float, message_deadline: float) -> bytes | bytearray:
        deadline, phase, limit = self._read_deadline(started, message_deadline)
        with trio.CancelScope(deadline=deadline):
            return await self._stream.receive_some(RECEIVE_SIZE)
        # Only reached when the deadline cancelled the read.
        raise CommTimeout(phase, limit or 0.0, self._peer)

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Close gracefully: a send in progress finishes first, then the stream closes.

        Idempotent. If cancelled, the connection is still closed (forcefully).
        Use :func:`trio.aclose_forcefully` to close at once (MINA's close-now).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._state is not ConnState.ERROR:
            self._state = ConnState.CLOSING
        try:
            if self._sending:
                await self._acquire_send()
                self._release_send()
        finally:
            self._closed = True
            if self._state is ConnState.CLOSING:
                self._state = ConnState.CLOSED
            self._log_closed()
            await self._stream.aclose()

    async def _break(self) -> None:
        """Move to ERROR and close at once (shielded: this runs on failure paths)."""
        self._state = ConnState.ERROR
        if not self._closed:
            self._closed = True
            self._log_closed()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    def _expire(self) -> None:
        """The watchdog's call: the waiting read's deadline passed; wake it."""
        self._expired = True
        if self._sock is not None and not self._closed:
            trio.lowlevel.notify_closing(self._sock)

    def _log_closed(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.forget(self)
        if logger.isEnabledFor(logging.DEBUG):
            stats = self._stats
            logger.debug(
                "connection #%d with %s closed (%s): %d messages in, %d out, open %.3fs",
                self._id,
                self._peer,
                self._state.name,
                stats.messages_received,
                stats.messages_sent,
                trio.current_time() - stats.created_at,
            )

    # -- hooks for the client and server layers ------------------------------

    def _set_state(self, state: ConnState) -> None:
        if self._state is not ConnState.ERROR and not self._closed:
            self._state = state

    def _begin_session(self) -> None:
        self._sessions += 1

    @property
    def _has_unread_bytes(self) -> bool:
        return bool(self._pending) or self._decoder.buffered > 0 or self._deferred_error is not None
