"""Test kit for users' own tests: connection pairs and fault injection.

Everything here runs in memory or on loopback; nothing reaches the network.

* :func:`connection_pair` joins two :class:`Connection` objects by memory
  streams, for testing a protocol without sockets.
* :func:`open_fd_count` and :func:`task_count` measure what a test must give
  back: compare them before and after to catch a leaked socket or task.
* :func:`fault_server` and :func:`fault_client` start a :class:`FaultyPeer`:
  a real socket peer (TCP on loopback, or a Unix socket) that speaks a codec
  correctly until a :class:`Fault` strikes: it resets the connection, stalls,
  half-closes, reads or writes one byte per tick, or sends garbage or an
  oversized frame. A fault server plays the server for a client under test;
  a fault client plays a client for a server under test.

Faults act on bytes, not messages, so the peer works below
:class:`Connection`: it encodes and decodes with the codec itself and counts
every byte, which is what lets a fault strike in the middle of a frame.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
import trio.testing

from ._connection import Connection, format_address, socket_of
from ._framing import Codec, LengthPrefixed, Lines

__all__ = [
    "Fault",
    "FaultyPeer",
    "connection_pair",
    "fault_client",
    "fault_server",
    "open_fd_count",
    "task_count",
]

In = TypeVar("In")
Out = TypeVar("Out")


def connection_pair(
    codec: Codec[In, Out], *, lockstep: bool = False
) -> tuple[Connection[In, Out], Connection[In, Out]]:
    """Return two :class:`Connection` objects joined by an in-memory stream pair.

    With ``lockstep=True`` the streams have no buffer at all
    (:func:`trio.testing.lockstep_stream_pair`), so every send waits for the
    peer to receive: use it to test backpressure.
    """
    make = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    left, right = make()
    return Connection(left, codec), Connection(right, codec)


def open_fd_count() -> int:
    """Return how many file descriptors this process has open (Linux, macOS).

    Take it before and after the code under test: a difference is a leaked
    socket or file. Closing takes a few scheduler rounds after the code
    returns, so poll for the expected value with a time bound.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            # Listing opens one descriptor itself; it is counted every time,
            # so differences are exact.
            return len(os.listdir(folder))
        except FileNotFoundError:
            continue
    raise RuntimeError("cannot count open file descriptors on this platform")


def task_count() -> int:
    """Return how many Trio tasks are alive in the current run.

    Walks the task tree from :func:`trio.lowlevel.current_root_task`, so it
    sees every task, in every nursery. Take it before and after the code
    under test: a difference is a task that outlived its ``async with``.
    """

    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    if root is None:  # the run is starting up or shutting down
        raise RuntimeError("task_count() needs a running Trio run")
    return count(root)


# -- what goes wrong ---------------------------------------------------------

# Kinds that strike once, when the peer's output reaches `after` bytes.
_STRIKES = frozenset({"stall", "reset", "half_close", "garbage", "oversized"})
# Kinds that change how every byte past `after` is written or read.
_SHAPES = frozenset({"none", "delay", "slow_reader", "slow_writer", "handshake_stall"})

# A TLS record header announcing a 512-byte handshake record (a ClientHello
# would follow): a server waiting for the rest of it never completes the
# handshake.
_TLS_RECORD_START = b"\x16\x03\x01\x02\x00"


@dataclass(frozen=True)
class Fault:
    """What a :class:`FaultyPeer` does wrong. Build one with the class methods.

    The peer counts the bytes it writes. A *striking* fault (``stall``,
    ``reset``, ``half_close``, ``garbage``, ``oversized``) lets the first
    ``after`` bytes of output go out normally and strikes as soon as they
    have (at once when ``after`` is 0: a fault server then strikes when it
    accepts, a fault client when it connects). Output that would cross
    ``after`` is cut there, so ``after=2`` with a 4-byte length header
    strikes in the middle of a frame.

    Attributes:
        kind: ``"none"``, ``"delay"``, ``"stall"``, ``"reset"``,
            ``"half_close"``, ``"slow_reader"``, ``"slow_writer"``,
            ``"garbage"``, ``"oversized"`` or ``"handshake_stall"``.
        after: bytes of output written normally before the fault acts.
        seconds: for ``delay``, the wait before each write; for the slow
            kinds, the tick between two bytes; for a striking kind, a pause
            between reaching ``after`` and striking (to let a reply be read
            before the connection dies, as a stale keep-alive connection does).
        data: the bytes ``garbage`` sends.
    """

    kind: str = "none"
    after: int = 0
    seconds: float = 0.0
    data: bytes = b""

    def __post_init__(self) -> None:
        if self.kind not in _STRIKES | _SHAPES:
            kinds = ", ".join(sorted(_STRIKES | _SHAPES))
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {kinds}")
        if not isinstance(self.after, int) or self.after < 0:
            raise ValueError(f"after must be a non-negative int, got {self.after!r}")
        if not (0 <= self.seconds < math.inf):
            raise ValueError(f"seconds must be finite and >= 0, got {self.seconds!r}")

    @classmethod
    def none(cls) -> Fault:
        """A well-behaved peer: an echo server, or a client that sends and reads."""
        return cls()

    @classmethod
    def delay(cls, seconds: float, *, after: int = 0) -> Fault:
        """Wait ``seconds`` before each write (once ``after`` bytes are out)."""
        return cls("delay", after, seconds)

    @classmethod
    def stall(cls, *, after: int = 0, pause: float = 0.0) -> Fault:
        """Stop reading and writing for good, keeping the connection open.

        The other side sees silence; once the socket buffers fill, its writes
        block too. Use it to test ``first_response``, ``first_request``,
        ``receive`` and ``send`` limits.
        """
        return cls("stall", after, pause)

    @classmethod
    def reset(cls, *, after: int = 0, pause: float = 0.0) -> Fault:
        """Reset the connection: close it with ``SO_LINGER`` 0, so TCP sends RST.

        Over a Unix socket there is no RST: the other side sees the
        connection end (``ECONNRESET`` if it had data unread by us, else EOF).
        """
        return cls("reset", after, pause)

    @classmethod
    def half_close(cls, *, after: int = 0, pause: float = 0.0) -> Fault:
        """Send EOF (shut down the write side) and go on reading until the other side closes.

        Needs a plain socket: TLS streams cannot half-close.
        """
        return cls("half_close", after, pause)

    @classmethod
    def slow_reader(cls, tick: float = 0.01) -> Fault:
        """Read one byte per ``tick`` seconds from the start; writes are normal."""
        return cls("slow_reader", 0, tick)

    @classmethod
    def slow_writer(cls, tick: float = 0.01, *, after: int = 0) -> Fault:
        """Write one byte per ``tick`` seconds once ``after`` bytes are out (slowloris)."""
        return cls("slow_writer", after, tick)

    @classmethod
    def garbage(cls, data: bytes, *, after: int = 0, pause: float = 0.0) -> Fault:
        """Send ``data`` (bytes that are not what the codec expects), then nothing more.

        The peer keeps reading until the other side closes. Sent after a
        complete reply, this makes stray bytes on a keep-alive connection.
        """
        return cls("garbage", after, pause, bytes(data))

    @classmethod
    def oversized(cls, *, after: int = 0, pause: float = 0.0) -> Fault:
        """Send the start of a frame one byte larger than the codec allows, then nothing more.

        For :class:`LengthPrefixed` that is a header announcing
        ``max_frame + 1`` bytes; for :class:`Lines`, ``max_line + 1`` bytes
        without a delimiter. Other codecs have no bound to exceed.
        """
        return cls("oversized", after, pause)

    @classmethod
    def handshake_stall(cls) -> Fault:
        """Start a TLS handshake and never finish it.

        A fault server reads the ClientHello and never answers; a fault
        client sends the first bytes of a TLS record and then nothing. Either
        way the peer keeps reading until the other side gives up.
        """
        return cls("handshake_stall")


def _oversized_bytes(codec: Codec[Any, Any]) -> bytes:
    if isinstance(codec, LengthPrefixed):
        size = codec.max_frame + 1
        if size >= 1 << (8 * codec.header_size):
            raise ValueError(
                f"header {codec.header!r} cannot announce more than max_frame={codec.max_frame}"
            )
        return struct.pack(codec.header, size)
    if isinstance(codec, Lines):
        return b"x" * (codec.max_line + 1)
    raise ValueError(f"Fault.oversized() needs a LengthPrefixed or Lines codec, not {codec!r}")


# -- the peer ----------------------------------------------------------------

_COUNTERS = ("connections", "bytes_sent", "bytes_received", "messages", "faults", "hangups")
# Replies waiting for the writer; past this the reader stops reading, so a
# stalled or slow writer back-pressures the other side instead of buffering.
_REPLY_QUEUE = 16


def _echo(message: Any) -> Any:
    return message


class FaultyPeer:
    """A socket peer that misbehaves on purpose (see :func:`fault_server`, :func:`fault_client`).

    It speaks ``codec`` correctly until its :class:`Fault` acts. As a server
    it answers each request with ``respond(request)`` (an echo by default;
    ``None`` means no reply); as a client it sends its requests on each
    connection and reads the replies.

    The counters below are live; :meth:`wait` blocks until they reach given
    values, which is how a test synchronises with the peer without sleeping.

    Attributes:
        fault: the :class:`Fault` applied to every connection.
        codec: the codec spoken.
        address: for a server, the bound ``(host, port)`` or Unix path; for a
            client, the address it connected to.
        received: every message decoded from the other side, in order
            (requests for a server, replies for a client).
        connections: connections accepted (server) or made (client).
        bytes_sent: bytes written, garbage included.
        bytes_received: bytes read.
        messages: messages decoded (the length of ``received``).
        faults: times the fault struck (once per connection at most).
        hangups: connections that the other side closed or reset.
    """

    def __init__(
        self,
        fault: Fault,
        codec: Codec[Any, Any],
        address: object,
        respond: Callable[[Any], Any] | None,
        *,
        tls: bool = False,
    ) -> None:
        # Fail here, before anything is bound or connected, not later in a
        # background task.
        if fault.kind == "oversized":
            _oversized_bytes(codec)
        if fault.kind == "half_close" and tls:
            raise ValueError("Fault.half_close() needs a plain socket: TLS cannot half-close")
        self.fault = fault
        self.codec = codec
        self.address = address
        self.received: list[Any] = []
        self.connections = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages = 0
        self.faults = 0
        self.hangups = 0
        self._respond = respond
        self._changed = trio.Event()

    @property
    def port(self) -> int:
        """The TCP port (of the listener for a server, of the server for a client)."""
        if isinstance(self.address, tuple):
            return int(self.address[1])
        raise AttributeError(f"a peer on a Unix socket ({self.address}) has no port")

    def __repr__(self) -> str:
        return f"<FaultyPeer {self.fault.kind} {format_address(self.address)}>"

    async def wait(self, **at_least: int) -> None:
        """Wait until every named counter reaches at least the given value.

        Example: ``await peer.wait(faults=1, hangups=1)``. Put a timeout
        around it (:func:`trio.fail_after`): if the event never happens, this
        waits forever.
        """
        for name in at_least:
            if name not in _COUNTERS:
                raise TypeError(f"unknown counter {name!r}; use one of {', '.join(_COUNTERS)}")
        while any(getattr(self, name) < value for name, value in at_least.items()):
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    def _count(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)
        self._changed.set()
        self._changed = trio.Event()


class _Link:
    """One connection of a :class:`FaultyPeer`: the fault's state on it."""

    def __init__(self, peer: FaultyPeer, stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        self.peer = peer
        self.fault = peer.fault
        self.stream = stream
        self.nursery = nursery
        self.sent = 0
        # After a strike no regular output goes out (the stream is either
        # dead, stalled, half-closed or already corrupted).
        self.silenced = False
        self.reading = trio.CancelScope()
        self.hung_up = False

    # -- writing -------------------------------------------------------------

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            await self.stream.send_all(data)
            self.sent += len(data)
            self.peer._count("bytes_sent", len(data))

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.silenced:
            return
        fault = self.fault
        kind = fault.kind
        if kind in _STRIKES:
            room = fault.after - self.sent
            if len(data) >= room:
                await self._send(memoryview(data)[:room])
                await self.strike()
                return
        elif kind == "delay" and self.sent >= fault.after:
            await trio.sleep(fault.seconds)
        elif kind == "slow_writer":
            view = memoryview(data)
            head = max(0, min(len(view), fault.after - self.sent))
            await self._send(view[:head])
            for i in range(head, len(view)):
                await self._send(view[i : i + 1])
                await trio.sleep(fault.seconds)
            return
        await self._send(data)

    async def start(self, *, client: bool) -> None:
        """Act on the faults that strike before any output."""
        kind = self.fault.kind
        if kind in _STRIKES and self.fault.after == 0:
            await self.strike()
        elif kind == "handshake_stall":
            self.silenced = True
            self.peer._count("faults")
            if client:
                await self._send(_TLS_RECORD_START)
        elif kind in ("delay", "slow_reader", "slow_writer"):
            self.peer._count("faults")

    async def strike(self) -> None:
        fault = self.fault
        self.silenced = True
        if fault.seconds:
            await trio.sleep(fault.seconds)
        self.peer._count("faults")
        if fault.kind == "reset":
            sock = socket_of(self.stream)
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(self.stream)
        elif fault.kind == "stall":
            self.reading.cancel()
            await trio.sleep_forever()
        elif fault.kind == "half_close":
            if not isinstance(self.stream, trio.abc.HalfCloseableStream):
                raise TypeError(f"cannot half-close a {type(self.stream).__name__}")
            await self.stream.send_eof()
        elif fault.kind == "garbage":
            await self._send(fault.data)
        elif fault.kind == "oversized":
            await self._send(_oversized_bytes(self.peer.codec))

    # -- reading -------------------------------------------------------------

    async def read(self, replies: trio.MemorySendChannel[Any] | None) -> None:
        """Read and decode until the other side closes; queue replies if serving.

        Closing ``replies`` at the end tells the writer that no more requests
        will come, so it sends what is queued and finishes.
        """
        with self.guard():
            if replies is None:
                await self._read()
            else:
                async with replies:
                    await self._read(replies)

    async def _read(self, replies: trio.MemorySendChannel[Any] | None = None) -> None:
        peer = self.peer
        fault = self.fault
        decoder: Any = peer.codec.decoder() if fault.kind != "handshake_stall" else None
        slow = fault.kind == "slow_reader"
        size = 1 if slow else 65536
        respond = peer._respond if replies is not None else None
        with self.reading:
            while True:
                data = await self.stream.receive_some(size)
                if not data:
                    self.hang_up()
                    return
                peer._count("bytes_received", len(data))
                if decoder is not None:
                    try:
                        messages = decoder.feed(data)
                    except Exception:
                        # The side under test sent bad bytes: keep draining,
                        # decode no more (the stream is out of sync).
                        decoder = None
                        messages = []
                    for message in messages:
                        peer.received.append(message)
                        peer._count("messages")
                        if respond is not None and replies is not None:
                            reply = respond(message)
                            if reply is not None:
                                await replies.send(reply)
                if slow:
                    await trio.sleep(fault.seconds)

    # -- ending --------------------------------------------------------------

    def hang_up(self) -> None:
        """Note that the other side closed or reset the connection (once)."""
        if not self.hung_up:
            self.hung_up = True
            self.peer._count("hangups")

    @contextmanager
    def guard(self) -> Iterator[None]:
        """End the link quietly on I/O errors, so the peer's nursery never fails."""
        try:
            yield
        except trio.ClosedResourceError:
            pass  # only we close the stream: a reset fault did
        except (trio.BrokenResourceError, OSError):
            self.hang_up()
            self.nursery.cancel_scope.cancel()


async def _run_link(
    peer: FaultyPeer, stream: trio.abc.Stream, *, client: bool, requests: tuple[Any, ...]
) -> None:
    """Drive one connection until the other side closes or the peer shuts down."""
    encode = peer.codec.encode
    try:
        async with stream, trio.open_nursery() as nursery:
            link = _Link(peer, stream, nursery)
            with link.guard():
                if client:
                    nursery.start_soon(link.read, None)
                    await link.start(client=True)
                    for request in requests:
                        await link.write(encode(request))
                else:
                    send, receive = trio.open_memory_channel[Any](_REPLY_QUEUE)
                    nursery.start_soon(link.read, send)
                    await link.start(client=False)
                    async with receive:
                        async for reply in receive:
                            await link.write(encode(reply))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # closing a TLS stream whose transport is already gone


@asynccontextmanager
async def _peer_tasks(
    peer: FaultyPeer, run: Callable[[trio.Nursery], Any]
) -> AsyncIterator[FaultyPeer]:
    """Run the peer's tasks in a nursery around the caller's block.

    An exception from the block is re-raised as itself, not inside an
    ``ExceptionGroup``, so ``pytest.raises`` around the block works.
    """
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        run(nursery)
        try:
            yield peer
        except BaseException as exc:
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        try:
            raise error
        finally:
            del error


async def _wrap_tls(
    stream: trio.abc.Stream,
    fault: Fault,
    ssl_context: ssl.SSLContext | None,
    *,
    server_side: bool,
    server_hostname: str | None = None,
) -> trio.abc.Stream:
    if ssl_context is None or fault.kind == "handshake_stall":
        return stream
    tls = trio.SSLStream(
        stream, ssl_context, server_side=server_side, server_hostname=server_hostname
    )
    await tls.do_handshake()
    return tls


@asynccontextmanager
async def fault_server(
    fault: Fault | None = None,
    *,
    codec: Codec[Any, Any] | None = None,
    port: int = 0,
    host: str = "127.0.0.1",
    path: str | os.PathLike[str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    respond: Callable[[Any], Any] | None = _echo,
) -> AsyncIterator[FaultyPeer]:
    """Listen on loopback (or a Unix socket) and misbehave toward every client.

    Use it as ``async with fault_server(Fault.reset(after=2)) as peer:``,
    then point the client under test at ``peer.port`` (or ``path``). Each
    accepted connection gets the fault; ``respond`` makes the reply to each
    request (an echo by default). With ``ssl_context`` the peer does TLS
    first (a context with a wrong or untrusted certificate tests the
    client's verification); ``Fault.handshake_stall()`` skips it.

    Leaving the block closes the listener and every connection, and removes
    the Unix socket file.

    Args:
        fault: what goes wrong (default: nothing, an echo server).
        codec: the codec spoken (default :class:`LengthPrefixed`).
        port: TCP port on ``host``; 0 asks the OS for a free one.
        host: the loopback address to bind (``"::1"`` for IPv6).
        path: a Unix socket path to bind instead of a TCP port.
        ssl_context: a server-side :class:`ssl.SSLContext` for TLS.
        respond: makes the reply to one request; ``None`` for no reply.
    """
    fault = fault or Fault()
    codec = codec or LengthPrefixed()
    peer = FaultyPeer(fault, codec, None, respond, tls=ssl_context is not None)
    if path is not None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(os.fspath(path))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        peer.address = os.fspath(path)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
        listener = listeners[0]
        for extra in listeners[1:]:
            await extra.aclose()
        peer.address = listener.socket.getsockname()[:2]

    async def serve_one(stream: trio.SocketStream) -> None:
        peer._count("connections")
        try:
            wrapped = await _wrap_tls(stream, fault, ssl_context, server_side=True)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            peer._count("hangups")
            await trio.aclose_forcefully(stream)
            return
        await _run_link(peer, wrapped, client=False, requests=())

    async def accept(nursery: trio.Nursery) -> None:
        while True:
            stream = await listener.accept()
            nursery.start_soon(serve_one, stream)

    try:
        async with _peer_tasks(peer, lambda nursery: nursery.start_soon(accept, nursery)):
            yield peer
    finally:
        await trio.aclose_forcefully(listener)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@asynccontextmanager
async def fault_client(
    fault: Fault | None = None,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    path: str | os.PathLike[str] | None = None,
    codec: Codec[Any, Any] | None = None,
    requests: Iterable[Any] = (),
    connections: int = 1,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> AsyncIterator[FaultyPeer]:
    """Connect to a server under test and misbehave toward it.

    Opens ``connections`` connections to ``host:port`` (or the Unix socket
    ``path``) before the block starts, so a refused connection raises
    :class:`OSError` right here. On each one the peer sends ``requests``
    through the fault, then reads replies (into ``peer.received``) until the
    server closes. Leaving the block closes every connection.

    Args:
        fault: what goes wrong (default: nothing, a well-behaved client).
        port: the server's TCP port on ``host``.
        host: the server's loopback address.
        path: the server's Unix socket path, instead of a port.
        codec: the codec spoken (default :class:`LengthPrefixed`).
        requests: the messages each connection sends.
        connections: how many connections to open (e.g. for slowloris).
        ssl_context: a client-side :class:`ssl.SSLContext` for TLS.
        server_hostname: the name to verify in the server's certificate
            (default ``host``).
    """
    fault = fault or Fault()
    codec = codec or LengthPrefixed()
    if (port is None) == (path is None):
        raise TypeError("fault_client() needs exactly one of port or path")
    address: object = os.fspath(path) if path is not None else (host, port)
    peer = FaultyPeer(fault, codec, address, None, tls=ssl_context is not None)
    requests = tuple(requests)
    streams: list[trio.abc.Stream] = []
    try:
        for _ in range(connections):
            stream: trio.abc.Stream
            if path is not None:
                stream = await trio.open_unix_socket(path)
            else:
                assert port is not None
                stream = await trio.open_tcp_stream(host, port)
            streams.append(stream)
            streams[-1] = await _wrap_tls(
                stream, fault, ssl_context, server_side=False,
                server_hostname=server_hostname or host,
            )  # fmt: skip
            peer._count("connections")
    except BaseException:
        for stream in streams:
            await trio.aclose_forcefully(stream)
        raise

    def start(nursery: trio.Nursery) -> None:
        for stream in streams:
            nursery.start_soon(_run_client_link, peer, stream, requests)

    async with _peer_tasks(peer, start):
        yield peer


async def _run_client_link(
    peer: FaultyPeer, stream: trio.abc.Stream, requests: tuple[Any, ...]
) -> None:
    await _run_link(peer, stream, client=True, requests=requests)
