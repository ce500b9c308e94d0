"""The Connection: one Trio stream, one codec, its state and its statistics.

A :class:`Connection` is a :class:`trio.abc.Channel` of messages and the one
owner of everything about a connection: its state, statistics, decoder,
pending messages, per-phase limits, reply outbox and socket fast paths. The
client, the pool, the server and the timers never write these fields; they
call the named operations in the last section of the class (documented in
``docs/architecture.md``).

Rules this module keeps (each one tested):

1. **Whole messages or a closed connection.** A write that began and did
   not complete, for any reason (cancelled, timed out, closed by another
   task, a reset), breaks the connection: ``ERROR``, closed at once. So bytes
   are never written after part of a message. (A send cancelled before it
   wrote anything leaves the connection as it was.) Every message leaves
   through one write path, :meth:`Connection._flush`.
2. **A timer that ends a read never touches a write.** A read deadline wakes
   the reader with :func:`trio.lowlevel.notify_closing`, which wakes every
   task blocked on the socket; a writer woken that way while the connection
   is still open goes back to waiting (:meth:`Connection._wait_writable`).
3. **Sends are serialized** (FIFO by caller), so several tasks may send; two
   tasks receiving at once raise :class:`trio.BusyResourceError`.
4. **Bounded in bytes.** Reads take at most ``RECEIVE_SIZE`` at once and the
   decoder bounds an unfinished message; replies accepted for a later write
   (the server's outbox) are written once they reach ``MAX_REPLY_BATCH``
   messages or ``MAX_REPLY_BYTES`` bytes, before anything more is read.
5. **ERROR is final**, like ``CLOSED``; nothing leaves it.
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Generic, NoReturn, TypeVar, Union

import trio

from ._errors import CommError, CommTimeout, ConnectionLost, ProtocolError
from ._timeouts import Limits

if TYPE_CHECKING:
    from ._framing import Codec
    from ._timers import Timers

__all__ = [
    "MAX_REPLY_BATCH",
    "MAX_REPLY_BYTES",
    "ConnState",
    "Connection",
    "ConnectionStats",
    "Idle",
    "PhaseLimit",
    "format_address",
]

In = TypeVar("In")
# Contravariant: a connection only accepts outgoing messages, so one that can
# send any bytes-like object is usable where one sending bytes is expected
# (a handler typed ``Connection[bytes, bytes]`` accepts the built-in codecs'
# ``Connection[bytes, bytes | bytearray | memoryview]``).
Out = TypeVar("Out", contravariant=True)

_ids = itertools.count(1)
# Opens and closes are logged at INFO on their own logger, so a service can
# show or hide them apart from everything else (`triocomm serve -v`).
logger = logging.getLogger("triocomm.connection")
_INF = math.inf
# Reads ask the stream for at most this much at once.
RECEIVE_SIZE = 64 * 1024
#: Replies a service accepts before writing them: past this count, or past
#: :data:`MAX_REPLY_BYTES`, a pipelined burst is written in several writes.
MAX_REPLY_BATCH = 256
#: Bytes of replies a service accepts before writing them (see above), so a
#: client that pipelines small requests for large replies and never reads
#: holds at most this plus one reply in the server, not a burst's worth.
MAX_REPLY_BYTES = 64 * 1024
# How long a service's connection whose handler failed may take to write
# the replies accepted before the failure.
_DELIVER_LIMIT = 5.0
# With an inactivity limit, large writes go out in pieces of this size so that
# the limit measures progress, not the time to write the whole message.
_WRITE_STEP = 256 * 1024
_FILE_CHUNK = 256 * 1024
# Waits for a peer to begin a message that the inactivity limit does not cover.
_QUIET_PHASES = frozenset({"first_request", "keepalive"})


class ConnState(enum.Enum):
    """Where a connection is in its life (Workflow's states, plus the end).

    Client: ``CONNECTED → (RECEIVING → SUCCESS → IDLE → CONNECTED)* →
    CLOSING → CLOSED``. Server: ``CONNECTED → (RECEIVING → KEEPALIVE)* →
    CLOSING → CLOSED``, ``RECEIVING`` lasting until the replies are written.
    Any failure leads to ``ERROR``, which is final like ``CLOSED``.
    ``CONNECTING`` names the time before a connection exists (the pool counts
    such slots as ``PoolStats.connecting``); a :class:`Connection` object is
    made once its stream is connected, so it is never in that state. The full
    table of transitions is ``triocomm._states``, drawn in the docs.
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


# Module globals for the state changes on the request paths (the service's
# round sets two per burst, the client's session four): a class attribute of
# an Enum is a slow look-up on CPython 3.11.
_ERROR = ConnState.ERROR
_RECEIVING = ConnState.RECEIVING
_KEEPALIVE = ConnState.KEEPALIVE


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


def socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket under ``stream`` (through TLS layers), or ``None`` for a memory stream."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    return None


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


def _read_error(exc: Exception, peer: str) -> Exception:
    """What a failed receive raises: bad input or a timeout as it is, a reset as ConnectionLost."""
    if isinstance(exc, (ProtocolError, CommTimeout, ConnectionLost)):
        return exc
    lost = ConnectionLost(f"connection to {peer} lost: {exc or 'reset'}")
    lost.__cause__ = exc
    return lost


def _nbytes(data: Any) -> int:
    """Size in bytes of a buffer (a typed memoryview's len() counts items)."""
    return len(data) if type(data) is bytes else memoryview(data).nbytes


def _rate_breach(began: float, nbytes: int, rate: float, grace: float) -> float:
    """When a message that began at ``began`` falls below ``rate`` bytes per second
    on average, if nothing more than its ``nbytes`` so far moves; never before
    ``grace`` seconds.

    Computed when a read or a write must wait, it is that wait's exact
    deadline: the rate can only fall while nothing moves, and any byte that
    moves ends the wait. So the rate costs nothing while data flows, and no
    alarm has to look at it periodically.
    """
    return began + max(grace, nbytes / rate)


_NO_LIMITS = Limits()
# Shared empty lists: the pending messages and the outbox of every connection
# with none. Never mutated (a connection that needs one makes its own).
_NO_PENDING: list[Any] = []
_NO_OUTBOX: list[Any] = []
# A waiting read's deadline once the timers found it passed.
_EXPIRED = -math.inf
# What _absorb returns when the bytes it was given completed no message.
_NOTHING: Any = object()


class PhaseLimit:
    """``with PhaseLimit(deadline, phase, limit, peer):`` a cancel scope whose
    deadline ending the block raises that phase's :class:`CommTimeout`.

    The one way a wait without the timers (a TLS read, a write waiting for
    room, a connect) is bounded by a limit.
    """

    __slots__ = ("_limit", "_peer", "_phase", "_scope")

    def __init__(self, deadline: float, phase: str, limit: float | None, peer: object) -> None:
        self._scope = trio.CancelScope(deadline=deadline)
        self._phase = phase
        self._limit = limit
        self._peer = peer

    def __enter__(self) -> trio.CancelScope:
        return self._scope.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        swallowed = self._scope.__exit__(exc_type, exc, tb)
        if self._scope.cancelled_caught:
            raise CommTimeout(self._phase, self._limit or 0.0, self._peer) from None
        return swallowed


class SessionFailed(Exception):
    """A passive session failed; the replies to the requests before it were written.

    Raised out of a service's round (:meth:`Connection._answer`); the service
    counts it as a handler failure. ``error`` is the user's own exception,
    ``what`` says which part failed.
    """

    what = "the handler raised"

    def __init__(self, error: Exception) -> None:
        super().__init__(f"{self.what}: {error!r}")
        self.error = error


class ReplyRefused(SessionFailed):
    """The codec refused a reply a service accepted (the ones before it were written)."""

    what = "the handler returned a reply the codec cannot encode"


# What _write_now left to do: the bytes, their message count, how many the
# kernel took (-1: all of them), and the codec's error for a refused reply.
_Unfinished = tuple[Any, int, int, "Exception | None"]

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
    the connection then moves to ``ERROR`` and is closed. A send that began
    writing and did not complete (cancelled, timed out, closed, a reset) also
    breaks the connection, since part of a message may be on the wire; one
    cancelled before writing anything leaves it as it was.

    ``receive`` returns a message already decoded from an earlier read without
    a schedule point (it still raises :class:`trio.Cancelled` if cancelled), so
    a pipelined burst is consumed without a task switch per message.
    """

    # Class defaults, so that a connection pays memory only for what it uses
    # (an instance attribute is made on first write).
    # Bad input found after good messages in the same read: raised by the
    # receive that follows them.
    _deferred_error: ProtocolError | None = None
    # The client's or service's Timers, which time this connection's waiting
    # reads; None (or not running): a cancel scope per wait.
    _timers: Timers | None = None
    # The deadline of the read waiting now; _EXPIRED once _on_alarm found it passed.
    _wait_deadline: float = _INF
    # When the timers' live alarm for this connection comes due (_INF: none):
    # a wait whose deadline is no earlier needs no arming (see _arm_wait).
    _alarm_at: float = _INF
    # False for a connection read by a loop with a schedule point of its own
    # in every round (the server's request loop): a read that finds data
    # then returns without one.
    _yield_on_data = True
    # Called when a read must wait for data (the socket had none), before it
    # waits: the server's hook that makes a connection evictable.
    _on_wait: Callable[[], None] | None = None
    # Replies of the passive round in progress accepted and not yet written
    # (see _answer); the list is emptied in place when they are.
    _outbox: list[Any] = _NO_OUTBOX
    # The requests of the passive round in progress not handed to the handler
    # yet (see _answer): seq counts those handed.
    _round: list[Any] = _NO_PENDING
    # The load balancer a PROXY header came through (see proxied_by).
    _proxied_by: object = None

    def __init__(self, stream: trio.abc.Stream, codec: Codec[In, Out]) -> None:
        self._stream = stream
        self._codec = codec
        self._encode = codec.encode
        # The codec's optional batch encoder (one call for many messages).
        self._encode_batch = getattr(codec, "encode_batch", None)
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
        # _read_now and _write_nowait), skipping SocketStream's layers.
        self._sock = stream.socket if _DIRECT_IO and type(stream) is trio.SocketStream else None
        # The run's clock, bound once: cheaper than trio.current_time() on
        # every read and write, and still the MockClock under test.
        self._now = trio.lowlevel.current_clock().current_time
        sock = socket_of(stream)
        self._local: object = None
        self._remote: object = None
        if sock is not None:
            try:
                self._local = sock.getsockname()
                self._remote = sock.getpeername()
            except OSError:
                pass
        self._peer = format_address(self._remote) if sock is not None else "memory stream"
        logger.info("connection #%d with %s opened", self._id, self._peer)

    # -- properties ----------------------------------------------------------

    @property
    def id(self) -> int:
        """A process-unique number for this connection."""
        return self._id

    @property
    def seq(self) -> int:
        """Sessions started on this connection before the current one (0 in the first).

        On a service's connection, the requests received before the current one.
        """
        return self._sessions - len(self._round) - 1 if self._sessions else 0

    @property
    def sessions(self) -> int:
        """Sessions started on this connection, the current one included.

        On a service's connection, the requests handed to the handler so far
        (``seq + 1`` while the handler runs). A service's
        :attr:`ServerStats.sessions` is the sum over its connections.
        """
        return self._sessions - len(self._round)

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
    def proxied_by(self) -> object:
        """The load balancer's address when a PROXY protocol header named the
        client (:attr:`remote_address` is then the client's), else ``None``."""
        return self._proxied_by

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

    @property
    def pending(self) -> int:
        """Messages already decoded and waiting to be received (no I/O needed)."""
        return len(self._pending)

    @property
    def between_messages(self) -> bool:
        """True when everything received so far has been handed out as whole messages.

        False while decoded messages wait to be received (:attr:`pending`),
        part of a message is buffered, or bad input waits to be raised. A pool
        reuses, and a service evicts, only a connection between messages:
        anything else would desynchronise the stream.
        """
        return not self._pending and not self._decoder.buffered and self._deferred_error is None

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
        await self._flush(self._encode(value), 1)

    async def send_many(self, values: Iterable[Out]) -> None:
        """Encode several messages and send them in one write.

        Every message is encoded before anything is written: a message the
        codec refuses raises :class:`TypeError` (or the codec's error) and
        none of them is sent.
        """
        if type(values) is not list:
            values = list(values)
        if not values:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            await trio.lowlevel.checkpoint()
            return
        await self._flush(self._encode_many(values), len(values))

    def _encode_many(self, values: list[Any]) -> Any:
        """The bytes of one or more messages, through the codec's batch encoder if it has one."""
        if len(values) == 1:
            return self._encode(values[0])
        encode_batch = self._encode_batch
        if encode_batch is not None:
            return encode_batch(values)
        encode = self._encode
        return b"".join([encode(v) for v in values])

    async def flush(self) -> None:
        """Write now what was accepted for a later write.

        In a :func:`~triocomm.serve` handler, the replies to the earlier
        requests of a pipelined batch are accepted and written together when
        the batch is done (or 256 replies or 64 KiB are waiting); a handler
        about to take long can ``await conn.flush()`` to send them first.
        Elsewhere there is nothing to write and it is only a checkpoint.

        Raises what :meth:`send` raises; if the codec refuses an accepted
        reply, the replies before it are written and ``ReplyRefused`` is raised.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._flush(cancel_checked=True)

    async def _flush(self, data: Any = None, count: int = 0, cancel_checked: bool = False) -> None:
        """The one write path: the accepted replies, then ``data`` (``count`` messages).

        Everything goes out in one write (:meth:`_write_now`). The usual case
        (a plain socket whose kernel buffer takes it all) is a cancellation
        check, one system call and a schedule point; otherwise
        :meth:`_finish_write` waits for room under the send limits. With
        nothing to write it is a schedule point. ``cancel_checked``: the
        caller checked for cancellation in this round already.

        Raises:
            ReplyRefused: the codec refused an accepted reply; the replies
                before it were written, nothing after it.
        """
        if not cancel_checked and (data is not None or self._outbox):
            await trio.lowlevel.checkpoint_if_cancelled()
        rest = self._write_now(data, count)
        if rest is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._finish_write(rest)

    def _write_now(self, data: Any = None, count: int = 0) -> _Unfinished | None:
        """The write itself, with no checkpoint: the accepted replies, then ``data``.

        Encodes the outbox (emptied in place: the round in progress holds
        it) and hands everything to the socket at once. Returns ``None`` when
        all of it went, or there was nothing to write; otherwise what is left
        for :meth:`_finish_write`. A service's round (:meth:`_answer`) calls
        it directly, without :meth:`_flush`'s schedule point, since the
        request loop makes the round's own.
        """
        refused = None
        outbox = self._outbox
        if outbox:
            encode_batch = self._encode_batch
            if data is None and encode_batch is not None:
                # The usual round: one batch of replies (a lone reply, as in a
                # ping-pong, is one encode: cheaper).
                count = len(outbox)
                try:
                    data = encode_batch(outbox) if count > 1 else self._encode(outbox[0])
                except Exception:  # the slow path finds the refused reply
                    data, count, refused = self._encode_replies(outbox, None, 0)
            else:
                # A handler's push during a passive session goes out after
                # the replies accepted before it, never ahead of them.
                data, count, refused = self._encode_replies(outbox, data, count)
            outbox.clear()
        if data is None:
            return None if refused is None else (None, 0, -1, refused)
        sent = self._write_nowait(data, count)
        if sent < 0 and refused is None:
            return None
        return data, count, sent, refused

    async def _finish_write(self, rest: _Unfinished) -> None:
        """Finish what :meth:`_write_now` could not: wait for room and write the rest,
        then raise the codec's error for a refused reply."""
        data, count, sent, refused = rest
        if sent >= 0:
            await self._write(data, count, sent)
        if refused is not None:
            raise ReplyRefused(refused)

    def _write_nowait(self, data: Any, count: int) -> int:
        """Hand ``data`` (``count`` messages) to a plain socket at once, with no checkpoint.

        Returns -1 when the kernel took all of it (the write is counted);
        otherwise the bytes it took, possibly 0 (also when the connection is
        not a plain socket, is closed, or another send is in progress, or on
        an error, which :meth:`_write` then meets again and handles).
        """
        sock = self._sock
        if sock is None or self._sending or self._closed:
            return 0
        try:
            sent = os.write(sock.fileno(), data)
        except OSError:
            return 0
        if sent < (len(data) if type(data) is bytes else _nbytes(data)):
            return sent
        self._count_sent(sent, count)
        return -1

    def _count_sent(self, nbytes: int, count: int) -> None:
        """A write of ``count`` messages, ``nbytes`` bytes in all, is done."""
        stats = self._stats
        stats.bytes_sent += nbytes
        stats.messages_sent += count
        stats.last_send_at = self._now()

    async def _write(self, data: Any, count: int, sent: int = 0) -> None:
        """Write ``data`` whole, of which ``sent`` bytes are written already, or break."""
        if self._closed:
            raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
        size = _nbytes(data)
        if self._sending:
            await self._acquire_send()
        else:
            self._sending = True  # uncontended: no coroutine for _acquire_send
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            try:
                await self._write_all(data, size, sent)
            except trio.BrokenResourceError as exc:
                await self.abort()
                raise ConnectionLost(f"connection to {self._peer} lost while sending") from exc
            except BaseException:
                # Cancelled, timed out or closed part-way: the stream may
                # hold half a message, so nothing valid can follow on it.
                await self.abort()
                raise
        finally:
            self._release_send()
        self._count_sent(size, count)

    async def _write_all(self, data: Any, size: int, sent: int) -> None:
        sock = self._sock
        if sock is None:
            if self._limits.unlimited:
                await self._stream.send_all(data)
            else:
                await self._write_limited(data)
            return
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

    async def _write_rest(
        self, sock: trio.socket.SocketType, data: Any, sent: int, total: int
    ) -> None:
        """Write what the kernel did not take at once, waiting for room under the limits."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        began = self._now()
        while sent < total:
            await self._wait_writable(sock, began, sent)
            try:
                sent += os.write(sock.fileno(), view[sent:])
            except BlockingIOError:
                pass
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def _wait_writable(self, sock: trio.socket.SocketType, began: float, taken: int) -> None:
        """Wait for room in the socket's send buffer, under the send limits.

        ``began``: when the write began; ``taken``: the bytes of it the kernel took.

        A read deadline wakes every task blocked on the socket (see
        :meth:`_on_alarm`); a writer woken that way while the connection is
        open waits again, under the same deadline: a timer that ends a read
        never cuts a write short.
        """
        with PhaseLimit(*self._write_deadline(began, taken), self._peer):
            while True:
                try:
                    await trio.lowlevel.wait_writable(sock)
                    return
                except trio.ClosedResourceError:
                    if self._closed:
                        raise

    def _write_deadline(self, began: float, taken: int) -> tuple[float, str, float | None]:
        """The deadline of a wait to write more of a write that began at ``began``,
        of which the stream took ``taken`` bytes, with the phase and limit that set it."""
        limits = self._limits
        phase, limit = "send", limits.send
        deadline = _INF if limit is None else began + limit
        rate = limits.send_rate
        if rate is not None:
            breach = _rate_breach(began, taken, rate, limits.rate_grace)
            if breach < deadline:
                phase, limit, deadline = "send_rate", rate, breach
        if limits.inactivity is not None:
            progress = self._now() + limits.inactivity
            if progress < deadline:
                return progress, "inactivity", limits.inactivity
        return deadline, phase, limit

    async def _write_limited(self, data: Any) -> None:
        began = self._now()
        limits = self._limits
        with memoryview(data) as view:
            total = view.nbytes
            # In steps, so that the progress limits see progress between them.
            stepped = limits.inactivity is not None or limits.send_rate is not None
            step = _WRITE_STEP if stepped else max(total, 1)
            for offset in range(0, max(total, 1), step):
                piece = view[offset : offset + step]
                # A stream shows no progress inside a step: the rate counts the
                # step as taken, so a peer above the minimum is never cut.
                with PhaseLimit(*self._write_deadline(began, offset + len(piece)), self._peer):
                    await self._stream.send_all(piece)

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
        if self._outbox:
            await self._flush()  # the accepted replies go first
        await self._acquire_send()
        sent = 0
        try:
            if self._closed:
                raise trio.ClosedResourceError(f"connection to {self._peer} is closed")
            sock = self._stream.socket if isinstance(self._stream, trio.SocketStream) else None
            began = self._now()
            try:
                if sock is not None and fd is not None:
                    async for n in self._sendfile(sock, fd, offset, count, began):
                        sent += n
                else:
                    async for n in self._send_chunks(f, fd, offset, count, began):
                        sent += n
            except (trio.BrokenResourceError, BrokenPipeError, ConnectionError) as exc:
                await self.abort()
                raise ConnectionLost(
                    f"connection to {self._peer} lost while sending a file"
                ) from exc
            except BaseException:
                # Part of the file may be on the wire: nothing can follow it.
                await self.abort()
                raise
        finally:
            self._release_send()
            self._stats.bytes_sent += sent
            if sent:
                self._stats.last_send_at = self._now()
        return sent

    async def _sendfile(
        self, sock: trio.socket.SocketType, fd: int, offset: int, count: int, began: float
    ) -> Any:
        sockfd = sock.fileno()
        start, end = offset, offset + count
        await trio.lowlevel.checkpoint()
        while offset < end:
            try:
                n = os.sendfile(sockfd, fd, offset, min(end - offset, 1 << 30))
            except BlockingIOError:
                await self._wait_writable(sock, began, offset - start)
                continue
            if n == 0:
                raise CommError(
                    f"file ended {end - offset} bytes early while sending to {self._peer}"
                )
            offset += n
            yield n

    async def _send_chunks(
        self, f: IO[bytes], fd: int | None, offset: int, count: int, began: float
    ) -> Any:
        start, end = offset, offset + count
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
            taken = offset - start + len(chunk)  # the chunk counts as taken (see _write_limited)
            with PhaseLimit(*self._write_deadline(began, taken), self._peer):
                await self._stream.send_all(chunk)
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
            trio.ClosedResourceError, trio.BusyResourceError: the connection
                was closed by us; another task is receiving.
        """
        pending = self._pending
        if pending and not self._closed:
            await trio.lowlevel.checkpoint_if_cancelled()
            message = pending.pop()
            if not pending:
                self._pending = _NO_PENDING
            return message
        if self._receiving or self._closed:
            self._refuse_receive()
        self._receiving = True
        # Every wait is written out in this frame, the rest are plain calls: a
        # connection waiting for a message holds this one frame and no other.
        try:
            if self._eof or self._deferred_error is not None:
                await trio.lowlevel.checkpoint()
                self._raise_at_end()
            unlimited = self._limits.unlimited
            sock = self._sock
            # When this call began (read from the clock only if a deadline
            # needs it), and when the message began once its first byte is in.
            started = message_began = _INF
            data: bytes | bytearray | None
            while True:
                if message_began is _INF and not unlimited and self._decoder.buffered:
                    started = min(started, self._now())
                    message_began = self._message_began(started)
                if sock is None:
                    data = await self._read_stream(started, message_began)
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    waited = False
                    while (data := self._read_now(sock)) is None:
                        waited = True
                        if self._on_wait is not None:
                            self._on_wait()
                        started = min(started, self._now())
                        deadline, phase, limit = self._read_deadline(started, message_began)
                        if self._arm_wait(deadline):
                            try:
                                await trio.lowlevel.wait_readable(sock)
                            except trio.ClosedResourceError:
                                self._raise_if_expired(phase, limit)
                                raise
                            finally:
                                self._wait_deadline = _INF
                            continue
                        with PhaseLimit(deadline, phase, limit, self._peer):
                            await trio.lowlevel.wait_readable(sock)
                    if not waited:
                        if message_began is not _INF:
                            self._check_receive_limit(message_began)
                        if self._yield_on_data:
                            await trio.lowlevel.cancel_shielded_checkpoint()
                message = self._absorb(data)
                if message is not _NOTHING:
                    return message
        except (trio.BrokenResourceError, ProtocolError, CommTimeout) as exc:
            await self.abort()
            raise _read_error(exc, self._peer)  # noqa: B904 (its cause is set)
        finally:
            self._receiving = False

    async def _read_stream(self, started: float, message_began: float) -> bytes | bytearray:
        """One read from a stream that is not a plain socket (TLS, memory), under the limits."""
        if self._on_wait is not None:
            self._on_wait()  # whether it will wait is not known: it counts as a wait
        if self._limits.unlimited:
            return await self._stream.receive_some(RECEIVE_SIZE)
        deadline = self._read_deadline(min(started, self._now()), message_began)
        with PhaseLimit(*deadline, self._peer):
            return await self._stream.receive_some(RECEIVE_SIZE)
        raise AssertionError("unreachable: the scope raised its timeout")  # pragma: no cover

    def _refuse_receive(self) -> NoReturn:
        """Why a receive cannot run: another task is receiving, or the connection is closed."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this connection")
        raise trio.ClosedResourceError(f"connection to {self._peer} is closed")

    def _read_now(self, sock: trio.socket.SocketType) -> bytes | None:
        """What the socket holds now (``b""`` at its end), or ``None`` if it is empty.

        A function of its own, not written out in :meth:`receive`: the
        traceback of the ``BlockingIOError`` it catches gives the frame that
        raised it a frame object, which would live as long as a waiting
        receive (about 300 bytes per idle connection).
        """
        try:
            return os.read(sock.fileno(), RECEIVE_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    def _raise_at_end(self) -> None:
        """The stream has nothing more to give: raise the bad input found, or its end."""
        error = self._deferred_error
        if error is not None:
            # Bad input after good messages: raised now that they are taken.
            self._deferred_error = None
            raise error
        raise trio.EndOfChannel

    def _absorb(self, data: bytes | bytearray | None) -> Any:
        """Count and decode bytes just read: the first message they complete, or ``_NOTHING``.

        Further messages of the same read become pending. Raises
        :class:`trio.EndOfChannel` at a clean end, :class:`ConnectionLost` at
        an end in the middle of a message, and the decoder's errors.
        """
        if not data:
            self._eof = True
            buffered = self._decoder.buffered
            if buffered:
                raise ConnectionLost(
                    f"{self._peer} closed the connection in the middle of a message "
                    f"({buffered} bytes of it received)"
                )
            raise trio.EndOfChannel
        stats = self._stats
        stats.bytes_received += len(data)
        stats.last_receive_at = self._now()
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            if not exc.messages:
                raise
            # Messages that arrived whole before the bad bytes are handed out
            # first (a server answers them); the receive after them raises.
            # The state is ERROR from now on: the connection is never reused.
            self._state = ConnState.ERROR
            self._deferred_error = exc
            messages = list(exc.messages)
            exc.messages = ()
        except Exception as exc:
            # A user codec raising something else still means bad input.
            raise ProtocolError(f"cannot decode data from {self._peer}: {exc!r}") from exc
        if not messages:
            return _NOTHING
        stats.messages_received += len(messages)
        if len(messages) == 1:
            return messages[0]
        # The rest of the burst becomes the pending list with no copy (the
        # decoder hands its list over; see Decoder.feed).
        if type(messages) is not list:
            messages = list(messages)
        messages.reverse()
        first = messages.pop()
        self._pending = messages
        return first

    def _message_began(self, started: float) -> float:
        """When a message whose first byte is buffered began, for its limits.

        At that byte, but not before this call began: time the application
        spent elsewhere while the bytes sat buffered is not the peer's delay.
        """
        return max(self._stats.last_receive_at or 0.0, started)

    def _check_receive_limit(self, message_began: float) -> None:
        # A message that keeps coming but never ends still times out.
        receive = self._limits.receive
        if receive is not None and self._now() >= message_began + receive:
            raise CommTimeout("receive", receive, self._peer)

    def _read_deadline(
        self, started: float, message_began: float
    ) -> tuple[float, str, float | None]:
        """The deadline of the next read, with the phase and limit that set it."""
        limits = self._limits
        if message_began is _INF and not self._decoder.buffered:
            # Waiting for the first byte of a message: no rate applies.
            phase, limit = limits.first_phase, limits.first_timeout
            deadline = _INF if limit is None else started + limit
        else:
            phase, limit = "receive", limits.receive
            deadline = _INF if limit is None else message_began + limit
            rate = limits.receive_rate
            if rate is not None:
                # The bytes of the message so far are what the decoder holds.
                received = self._decoder.buffered
                breach = _rate_breach(message_began, received, rate, limits.rate_grace)
                if breach < deadline:
                    phase, limit, deadline = "receive_rate", rate, breach
        # A peer that has not started its next request is not stalled, only
        # quiet: the first_request / keepalive limit alone bounds that wait,
        # else inactivity (10 s) would silently cut keep-alive (60 s) short.
        if limits.inactivity is not None and phase not in _QUIET_PHASES:
            progress = self._now() + limits.inactivity
            if progress < deadline:
                phase, limit, deadline = "inactivity", limits.inactivity, progress
        return deadline, phase, limit

    def _arm_wait(self, deadline: float) -> bool:
        """Have the timers end the coming wait at ``deadline``.

        True when the wait needs no cancel scope: there is no deadline, or the
        timers keep it. False when there are no running timers to keep it.
        """
        if deadline == _INF:
            return True
        if deadline < self._alarm_at:
            timers = self._timers
            if timers is None or not timers.arm(self, deadline):
                return False
            self._alarm_at = deadline
        self._wait_deadline = deadline
        return True

    def _raise_if_expired(self, phase: str, limit: float | None) -> None:
        """A timed wait was woken by a close: raise its timeout if the timers did it."""
        if self._wait_deadline == _EXPIRED:
            raise CommTimeout(phase, limit or 0.0, self._peer) from None

    def _on_alarm(self, now: float) -> float:
        """The timers' call (see ``_timers.py``): end the waiting read if its deadline passed."""
        wait = self._wait_deadline
        if wait > now:
            self._alarm_at = wait  # the timers arm it again (none if inf)
            return wait  # a later deadline, or nothing waiting (inf)
        self._alarm_at = _INF
        if wait == _EXPIRED:
            return _INF
        self._wait_deadline = _EXPIRED
        if self._sock is not None and not self._closed:
            # Wakes every task blocked on this socket; writers wait again
            # (_wait_writable), the reader raises its timeout (_end_wait).
            trio.lowlevel.notify_closing(self._sock)
        return _INF

    # -- closing -------------------------------------------------------------

    async def aclose(self) -> None:
        """Close gracefully: what was accepted is written first, then the stream closes.

        "Accepted" is a send in progress in another task and, in a
        :func:`~triocomm.serve` handler, the replies to the earlier requests
        of the same batch (so a handler that ends its connection, like
        memcached's ``quit``, still answers what came before it).
        Idempotent. If cancelled, the connection is still closed (forcefully).
        Use :func:`trio.aclose_forcefully` to close at once (MINA's close-now).
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._state is not ConnState.ERROR:
            self._state = ConnState.CLOSING
        if self._round:
            self._end_round()
        try:
            if self._outbox:
                await self._flush()
            elif self._sending:
                await self._acquire_send()
                self._release_send()
        except (CommError, trio.BrokenResourceError, trio.ClosedResourceError, ReplyRefused):
            pass  # what could be written was; the connection closes all the same
        finally:
            if not self._closed:
                self._closed = True
                if self._state is ConnState.CLOSING:
                    self._state = ConnState.CLOSED
                self._log_closed()
                await self._stream.aclose()

    async def abort(self) -> None:
        """Close at once and mark the connection failed (``ERROR``).

        For a peer that broke the protocol above the codec, or a session that
        went wrong: nothing accepted is written any more, a pool never reuses
        the connection, and a service counts it as failed. Idempotent. It is
        not a cancellation point (it runs on failure paths, shielded), so the
        connection is closed when it returns, whatever the surrounding scopes.
        """
        self._state = ConnState.ERROR
        if self._round:
            self._end_round()
        if self._outbox:
            self._outbox.clear()  # never written: the stream is broken
        if not self._closed:
            self._closed = True
            self._log_closed()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    def _end_round(self) -> None:
        """Closing: the passive round in progress hands its handler no more requests.

        Those left were never started, so they leave the session count too.
        """
        self._sessions -= len(self._round)
        self._round.clear()

    def _log_closed(self) -> None:
        timers = self._timers
        if timers is not None:
            timers.disarm(self)
        if logger.isEnabledFor(logging.INFO):
            stats = self._stats
            logger.info(
                "connection #%d with %s closed (%s): %d messages in, %d out, open %.3fs",
                self._id,
                self._peer,
                self._state.name,
                stats.messages_received,
                stats.messages_sent,
                trio.current_time() - stats.created_at,
            )

    # -- operations for the client and server layers -------------------------
    #
    # The only way the other modules change a connection (docs/architecture.md).

    def _attach(
        self,
        timers: Timers,
        *,
        label: str | None = None,
        on_wait: Callable[[], None] | None = None,
        request_loop: bool = False,
        proxied: tuple[object, object] | None = None,
    ) -> None:
        """Join a client or service: its timers time the reads, its name for the peer.

        ``on_wait``: called when a read must wait (see ``_on_wait``).
        ``request_loop``: reads are made by a loop that has a schedule point
        of its own in every round, so a read that finds data skips one.
        ``proxied``: the client's address and the balancer's, from a PROXY
        header; the client's becomes the remote address and the peer's name.
        """
        self._timers = timers
        if proxied is not None:
            self._remote, self._proxied_by = proxied
            self._peer = format_address(self._remote)
            logger.info("connection #%d is from %s (PROXY header)", self._id, self._peer)
        if label is not None:
            self._peer = label
        if on_wait is not None:
            self._on_wait = on_wait
        if request_loop:
            self._yield_on_data = False

    def _set_state(self, state: ConnState, limits: Limits | None = None) -> bool:
        """Enter ``state``, with the phase limits that apply; returns whether it did.

        Never out of ERROR or a close: then the state stays, and it returns False.
        """
        if limits is not None:
            self._limits = limits
        if self._state is not _ERROR and not self._closed:  # the rule _answer writes out too
            self._state = state
            return True
        return False

    def _begin_session(self, limits: Limits | None = None) -> None:
        """A session starts: ``seq`` moves on; ``limits``, if given, bound it."""
        self._sessions += 1
        if limits is not None:
            self._limits = limits

    async def _exchange(self, data: Any) -> In:
        """``client.request``'s session: write one encoded message, return the reply.

        The write is this session's schedule point, so a reply already there
        is read without a second one. It is :meth:`_flush` written out (the
        same write, the same checkpoints), so that the wait for a reply and
        the write's schedule point suspend no frame of their own.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self._write_now(data, 1)
        if rest is None:
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._finish_write(rest)
        self._set_state(ConnState.RECEIVING)
        self._yield_on_data = False
        try:
            return await self.receive()
        finally:
            self._yield_on_data = True

    async def _answer(
        self, handler: Callable[[In, Connection[In, Out]], Awaitable[Any]], first: In, then: Limits
    ) -> None:
        """A service's passive round: answer ``first`` and every request decoded after it.

        Each request is a session of its own, handed to ``handler`` in order;
        :attr:`seq` counts them exactly with no work per request (the round's
        list holds what is left, taken with ``list.pop()``). Replies are
        accepted into the outbox and written when the burst is done, or as
        soon as they reach ``MAX_REPLY_BYTES`` or ``MAX_REPLY_BATCH``; a
        handler's own ``send``, ``flush`` or ``aclose`` writes them first.
        The round's cancellation check is its read's, and the caller makes
        its schedule point: a write done at once makes none here. Then the
        connection waits between requests: ``KEEPALIVE``, under ``then``.

        Raises:
            SessionFailed: the handler raised (the replies before were written,
                as far as the peer took them within a few seconds).
            ReplyRefused: the codec refused a reply (those before it were written).
        """
        items = self._pending
        if items:
            self._pending = _NO_PENDING
            items.append(first)
        else:
            items = [first]
        self._sessions += len(items)
        self._round = items
        if self._state is not _ERROR and not self._closed:
            self._state = _RECEIVING
        outbox = self._outbox = []
        # A codec with a batch encoder encodes the replies when they are
        # written (they are buffers, whose size is known); others encode now.
        encode = None if self._encode_batch is not None else self._encode
        # Only a burst longer than the count bound can reach it.
        counted = len(items) > MAX_REPLY_BATCH
        size = 0  # may overstate what waits after a handler's own write: harmless
        while items:
            request = items.pop()
            try:
                reply = await handler(request, self)
            except Exception as exc:
                await self._deliver_accepted()
                raise SessionFailed(exc) from exc
            if reply is None:
                continue
            try:
                if encode is not None:
                    reply = encode(reply)
                size += len(reply) if type(reply) is bytes else _nbytes(reply)
            except Exception as exc:  # a non-buffer for a batch codec, or encode's error
                await self._flush(cancel_checked=True)
                raise ReplyRefused(exc) from exc
            outbox.append(reply)
            if size >= MAX_REPLY_BYTES or (counted and len(outbox) >= MAX_REPLY_BATCH):
                await self._flush(cancel_checked=True)
                size = 0
        rest = self._write_now()  # no schedule point: the request loop makes it
        if rest is not None:
            await self._finish_write(rest)
        self._outbox = _NO_OUTBOX
        self._round = _NO_PENDING
        if self._state is not _ERROR and not self._closed:
            self._state = _KEEPALIVE
        self._limits = then

    async def _deliver_accepted(self) -> None:
        """After a failed session: write the replies accepted before it, as the peer takes them."""
        with trio.move_on_after(_DELIVER_LIMIT):
            try:
                await self.flush()
            except Exception:
                pass  # the connection fails all the same

    def _encode_replies(
        self, outbox: list[Any], data: Any, count: int
    ) -> tuple[Any, int, Exception | None]:
        """The bytes to write for the outbox (the replies, then ``data``), their
        message count, and the codec's error for a refused reply (nothing after it)."""
        refused = None
        if self._encode_batch is None:
            replies, encoded = b"".join(outbox), len(outbox)  # encoded by _answer
        else:
            replies, encoded, refused = self._encode_each(outbox)
        if refused is not None or data is None:
            return (replies if encoded else None), encoded, refused
        return b"".join([replies, data]), encoded + count, None

    def _encode_each(self, outbox: list[Any]) -> tuple[bytes, int, Exception | None]:
        """Batch-encode accepted replies; if the encoder refuses one, those before it."""
        try:
            return self._encode_many(outbox), len(outbox), None
        except Exception as exc:
            refused: Exception = exc
        # Find the reply the batch encoder refused; those before it still go.
        parts = []
        for reply in outbox:
            try:
                parts.append(self._encode(reply))
            except Exception as exc:
                refused = exc
                break
        return b"".join(parts), len(parts), refused
