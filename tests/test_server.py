"""Tests of the server: serve / serve_connections over TCP, Unix sockets and TLS.

Every client here is a raw Trio stream that writes and parses frames by hand,
so a bug in triocomm's own client cannot hide a bug in the server.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import termios
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trustme

import triocomm
from triocomm import Connection, ConnState, Idle, LengthPrefixed, Server, ServerTimeouts
from triocomm._connection import MAX_REPLY_BATCH
from triocomm._timers import _SWEEP_MIN

CODEC = LengthPrefixed()
LOOPBACK = "127.0.0.1"


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


class RawClient:
    """A hand-written client: length-prefixed frames over a bare Trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def send(self, *payloads: bytes) -> None:
        await self.stream.send_all(b"".join(frame(p) for p in payloads))

    def _parse(self) -> bytes | None:
        if len(self.buffer) < 4:
            return None
        (size,) = struct.unpack_from("!I", self.buffer)
        if len(self.buffer) < 4 + size:
            return None
        payload = bytes(self.buffer[4 : 4 + size])
        del self.buffer[: 4 + size]
        return payload

    async def receive(self, count: int = 1) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < count:
            payload = self._parse()
            if payload is not None:
                out.append(payload)
                continue
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError(f"server closed after {len(out)} of {count} replies")
            self.buffer += data
        return out

    async def request(self, payload: bytes) -> bytes:
        await self.send(payload)
        (reply,) = await self.receive()
        return reply

    async def closed_by_server(self) -> bool:
        """True when the server closed (EOF or reset) before sending anything more."""
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            return True
        return data == b""

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def connect(server: Server) -> RawClient:
    port = server.port
    assert port is not None
    return RawClient(await trio.open_tcp_stream(LOOPBACK, port))


async def echo(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    return request


@asynccontextmanager
async def running(
    handler: Callable[..., Awaitable[Any]],
    *,
    entry: Callable[..., Awaitable[None]] = triocomm.serve,
    **options: Any,
) -> AsyncIterator[Server]:
    options.setdefault("codec", CODEC)
    if "path" not in options:
        options.setdefault("host", LOOPBACK)
        options.setdefault("port", 0)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(partial(entry, handler, **options))
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def start_fails(**options: Any) -> None:
    """Start a service that is expected to fail; raise its error as itself."""
    options.setdefault("codec", CODEC)
    with trio.fail_after(5):  # a service that does start fails the test with TooSlowError
        await triocomm.serve(echo, **options)


async def settled(server: Server, open_connections: int = 0) -> None:
    """Wait until the service's connection tasks caught up (closed ones have ended)."""
    with trio.fail_after(5):
        while server.stats.connections_open != open_connections:
            await trio.sleep(0.005)


async def reconnect(path: str) -> RawClient:
    return RawClient(await trio.open_unix_socket(path))


def server_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("triocomm") and r.levelno >= level
    ]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", LOOPBACK).configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths must fit in 108 bytes; pytest's tmp_path may not.
    path = tempfile.mkdtemp(prefix="tcs-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- basics ----------------------------------------------------------------------


async def test_echo_over_tcp_reports_port_addresses_and_stats() -> None:
    async with running(echo) as server:
        assert server.port not in (None, 0)
        assert server.addresses == [(LOOPBACK, server.port)]
        client = await connect(server)
        assert await client.request(b"hello") == b"hello"
        assert await client.request(b"") == b""
        assert server.stats.connections_open == 1
        await client.aclose()
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.01)
        assert server.stats.connections_total == 1
        assert server.stats.sessions == 2
        assert not server.stats.errors


async def test_none_means_no_reply_and_order_is_kept() -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes | None:
        return None if request == b"quiet" else request.upper()

    async with running(handler) as server:
        client = await connect(server)
        await client.send(b"a", b"quiet", b"b", b"quiet", b"c")
        assert await client.receive(3) == [b"A", b"B", b"C"]
        await client.aclose()


async def test_seq_counts_requests_per_connection() -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conn.context.setdefault("seen", []).append(conn.seq)
        return str(conn.seq).encode()

    async with running(handler) as server:
        first, second = await connect(server), await connect(server)
        assert [await first.request(b"x") for _ in range(3)] == [b"0", b"1", b"2"]
        assert await second.request(b"x") == b"0"
        await first.send(b"p", b"q")
        assert await first.receive(2) == [b"3", b"4"]
        await first.aclose()
        await second.aclose()


async def test_server_states_connected_receiving_keepalive_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server-side diagram of docs/connection.md, as other tasks see it:
    # CONNECTED until the first request, RECEIVING while requests are
    # handled and their replies written, KEEPALIVE between requests, CLOSED
    # at the end. SUCCESS is never seen on the server (docs/connection.md).
    seen: list[tuple[str, ConnState]] = []
    conns: list[Connection[bytes, bytes]] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conns.append(conn)
        seen.append(("handler", conn.state))
        await trio.sleep(1)  # other tasks run while the request is handled
        return request

    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        seen.append(("idle", conn.state))

    async def watch() -> None:
        # Every change of state another task can see, in order.
        last = None
        while True:
            if conns and conns[0].state is not last:
                last = conns[0].state
                seen.append(("watch", last))
            await trio.sleep(0.01)

    options: dict[str, Any] = {"idle": {Idle.READ: 5.0}, "on_idle": on_idle, "timeouts": PATIENT}
    async with running(handler, **options) as server, trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        client = await connect(server)
        await trio.sleep(6)  # read-idle once before the first request
        assert await client.request(b"a") == b"a"
        await trio.sleep(1)
        await client.send(b"b", b"c")
        assert await client.receive(2) == [b"b", b"c"]
        await trio.sleep(1)
        await client.aclose()
        await settled(server)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert seen == [
        ("idle", ConnState.CONNECTED),
        ("handler", ConnState.RECEIVING),  # "a"
        ("watch", ConnState.RECEIVING),
        ("watch", ConnState.KEEPALIVE),
        ("handler", ConnState.RECEIVING),  # "b"
        ("watch", ConnState.RECEIVING),
        ("handler", ConnState.RECEIVING),  # "c", same burst
        ("watch", ConnState.KEEPALIVE),
        ("watch", ConnState.CLOSED),
    ]


async def test_pipelined_burst_is_answered_in_order_in_one_write(writes: list[int]) -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        # Some replies take a scheduling round, some do not: order must hold anyway.
        if int(request) % 3 == 0:
            await trio.sleep(0)
        return request

    async with running(handler) as server:
        client = await connect(server)
        requests = [str(i).encode() for i in range(50)]
        await client.send(*requests)  # one write, so one read on the server
        assert await client.receive(50) == requests
        assert writes == [sum(len(frame(r)) for r in requests)]
        await client.aclose()


async def test_a_huge_burst_is_flushed_every_max_reply_batch_replies(writes: list[int]) -> None:
    count = 2 * MAX_REPLY_BATCH + 10
    async with running(echo) as server:
        client = await connect(server)
        requests = [b"r%d" % i for i in range(count)]
        await client.send(*requests)
        assert await client.receive(count) == requests
        sizes = [
            sum(len(frame(r)) for r in requests[i : i + MAX_REPLY_BATCH])
            for i in (0, MAX_REPLY_BATCH)
        ]
        assert writes[:2] == sizes
        assert sum(writes) == sum(len(frame(r)) for r in requests)
        await client.aclose()


async def test_a_client_that_never_reads_is_back_pressured() -> None:
    """Read-ahead is bounded: while replies cannot leave, the server stops reading."""
    payload = b"x" * 1024
    conns: list[Connection[bytes, bytes]] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if not conns:
            conns.append(conn)
        return request

    async with running(handler) as server:
        client = await connect(server)
        sent = 0
        total = 64 * 1024 * 1024
        chunk = frame(payload) * 64

        async def flood() -> None:
            nonlocal sent
            while sent < total:
                await client.stream.send_all(chunk)
                sent += len(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            # Wait until the flood stalls: the server stopped reading.
            last, still = -1, 0
            with trio.fail_after(20):
                while still < 5:
                    await trio.sleep(0.05)
                    still = still + 1 if sent == last else 0
                    last = sent
            assert sent < total
            (conn,) = conns
            unanswered = conn.stats.bytes_received - conn.stats.bytes_sent
            # At most one read of requests plus one unfinished frame is held.
            assert 0 <= unanswered <= 64 * 1024 + len(frame(payload))
            assert conn.stats.bytes_received < sent
            nursery.cancel_scope.cancel()
        await client.aclose()


async def test_unix_socket_serves_and_removes_its_file(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "svc.sock")
    async with running(echo, path=path) as server:
        assert getattr(server, "port", None) is None  # a Unix socket has no port
        with pytest.raises(AttributeError, match="no port"):
            server.port  # noqa: B018
        assert server.addresses == [path]
        assert os.path.exists(path)
        client = RawClient(await trio.open_unix_socket(path))
        assert await client.request(b"over unix") == b"over unix"
        await client.aclose()
    assert not os.path.exists(path)


async def test_unix_socket_replaces_a_stale_file_and_refuses_live_or_foreign_ones(
    sock_dir: str,
) -> None:
    stale = os.path.join(sock_dir, "stale.sock")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(stale)
    leftover.close()  # the file stays, nobody listens
    async with running(echo, path=stale) as server:
        client = RawClient(await trio.open_unix_socket(stale))
        assert await client.request(b"ok") == b"ok"
        await client.aclose()
        with pytest.raises(OSError, match="already listening"):
            await start_fails(path=stale)
        assert os.path.exists(stale)
        again = await reconnect(stale)
        assert await again.request(b"alive") == b"alive"
        await again.aclose()
        assert getattr(server, "port", None) is None
    plain = os.path.join(sock_dir, "plain.txt")
    with open(plain, "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError):
        await start_fails(path=plain)
    with open(plain) as f:
        assert f.read() == "keep me"


async def test_host_none_binds_every_interface() -> None:
    async with running(echo, host=None) as server:
        hosts = {address[0] for address in server.addresses}
        assert hosts <= {"0.0.0.0", "::"}
        assert "0.0.0.0" in hosts or "::" in hosts
        client = await connect(server)
        assert await client.request(b"any") == b"any"
        await client.aclose()


async def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with running(echo, host="::1") as server:
        client = RawClient(await trio.open_tcp_stream("::1", server.port))
        assert await client.request(b"six") == b"six"
        await client.aclose()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"port": None}, ValueError),
        ({"path": "/tmp/x.sock"}, ValueError),  # together with port=0
        ({"max_connections": 0}, ValueError),
        ({"max_connections": 1.5}, TypeError),
        ({"idle": {Idle.READ: 1.0}}, ValueError),  # no on_idle
        ({"on_idle": echo}, ValueError),  # no idle
        ({"idle": {Idle.READ: 0}, "on_idle": echo}, ValueError),
        ({"idle": {"read": 1.0}, "on_idle": echo}, TypeError),
        ({"timeouts": triocomm.Timeouts()}, TypeError),
    ],
)
async def test_bad_options_fail_before_binding(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        await start_fails(**{"port": 0, "host": LOOPBACK, **options})


# -- TLS -------------------------------------------------------------------------


async def tls_connect(server: Server, client_context: ssl.SSLContext) -> RawClient:
    raw = await trio.open_tcp_stream(LOOPBACK, server.port)
    stream = trio.SSLStream(raw, client_context, server_hostname="localhost")
    await stream.do_handshake()
    return RawClient(stream)


async def test_tls_echo(tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_context, client_context = tls_contexts

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        return b"secure" if conn.is_secure else b"plain"

    async with running(handler, ssl_context=server_context) as server:
        client = await tls_connect(server, client_context)
        assert await client.request(b"?") == b"secure"
        await client.aclose()


async def test_failed_tls_handshake_closes_only_that_connection(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    server_context, client_context = tls_contexts
    async with running(echo, ssl_context=server_context) as server:
        good = await tls_connect(server, client_context)
        bad = await connect(server)
        await bad.stream.send_all(b"GET / HTTP/1.1\r\n\r\n")  # plaintext, not TLS
        with trio.fail_after(5):
            assert await bad.closed_by_server()
        await settled(server, 1)
        assert await good.request(b"still here") == b"still here"
        assert server.stats.errors == {"handshake": 1}
        (line,) = server_records(caplog)
        assert "TLS handshake with 127.0.0.1:" in line
        assert "failed" in line
        await good.aclose()
        await bad.aclose()


async def test_tls_handshake_has_its_own_timeout(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    server_context, _ = tls_contexts
    timeouts = ServerTimeouts(handshake=0.2, first_request=None)
    async with running(echo, ssl_context=server_context, timeouts=timeouts) as server:
        silent = await connect(server)
        with trio.fail_after(5):
            assert await silent.closed_by_server()
        await settled(server, 0)
        (line,) = server_records(caplog)
        assert "timed out after 0.2s" in line
        assert "127.0.0.1:" in line
        await silent.aclose()


# -- timeouts --------------------------------------------------------------------


async def test_first_request_timeout(caplog: pytest.LogCaptureFixture) -> None:
    async with running(echo, timeouts=ServerTimeouts(first_request=0.2)) as server:
        client = await connect(server)
        with trio.fail_after(5):
            assert await client.closed_by_server()
        await settled(server, 0)
        assert server.stats.errors == {"timeout": 1}
        (line,) = server_records(caplog)
        assert "first_request timeout (limit 0.2s)" in line
        await client.aclose()


async def test_keepalive_closes_quietly_and_inactivity_does_not_cut_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timeouts = ServerTimeouts(keepalive=0.6, inactivity=0.1)
    async with running(echo, timeouts=timeouts) as server:
        client = await connect(server)
        assert await client.request(b"1") == b"1"
        await trio.sleep(0.3)  # three inactivity periods, well inside keepalive
        assert await client.request(b"2") == b"2"
        start = trio.current_time()
        with trio.fail_after(5):
            assert await client.closed_by_server()
        await settled(server, 0)
        assert trio.current_time() - start >= 0.5
        assert not server.stats.errors
        assert server_records(caplog) == []
        await client.aclose()


async def test_slowloris_is_cut_by_the_receive_limit_and_others_are_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timeouts = ServerTimeouts(receive=0.3)
    async with running(echo, timeouts=timeouts) as server:
        slow, fast = await connect(server), await connect(server)
        message = frame(b"a request sent one byte at a time")
        closed = False
        with trio.fail_after(5):
            for byte in message:
                try:
                    await slow.stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    closed = True
                    break
                assert await fast.request(b"fast") == b"fast"
                await trio.sleep(0.05)
            assert closed or await slow.closed_by_server()
        await settled(server, 1)
        assert server.stats.errors == {"timeout": 1}
        (line,) = server_records(caplog)
        assert "receive timeout (limit 0.3s)" in line
        assert await fast.request(b"after") == b"after"
        await slow.aclose()
        await fast.aclose()


# -- isolation -------------------------------------------------------------------


async def test_handler_exception_closes_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conns: dict[bytes, Connection[bytes, bytes]] = {}

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conns[request] = conn
        if request == b"boom":
            raise RuntimeError("handler bug")
        return request

    async with running(handler) as server:
        victim, other = await connect(server), await connect(server)
        await victim.send(b"before", b"boom", b"after")
        # The reply to the request before the failure is still delivered.
        assert await victim.receive() == [b"before"]
        with trio.fail_after(5):
            assert await victim.closed_by_server()
        await settled(server, 1)
        assert await other.request(b"fine") == b"fine"
        assert server.stats.errors == {"handler": 1}
        records = [r for r in caplog.records if r.name.startswith("triocomm")]
        assert len(records) == 1
        assert records[0].levelno == logging.ERROR
        assert "127.0.0.1:" in records[0].getMessage()
        assert "handler bug" in records[0].getMessage()
        assert conns[b"boom"].state is ConnState.ERROR
        await other.aclose()
        await settled(server)
        assert conns[b"fine"].state is ConnState.CLOSED
        await victim.aclose()
        await other.aclose()


async def test_unencodable_reply_is_a_handler_error(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> Any:
        return "text, not bytes"

    async with running(handler) as server:
        client = await connect(server)
        await client.send(b"x")
        with trio.fail_after(5):
            assert await client.closed_by_server()
        await settled(server, 0)
        assert server.stats.errors == {"handler": 1}
        (line,) = server_records(caplog)
        assert "cannot encode" in line
        await client.aclose()


async def test_oversized_frame_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async with running(echo, codec=LengthPrefixed(max_frame=100)) as server:
        bad, good = await connect(server), await connect(server)
        await bad.stream.send_all(struct.pack("!I", 1_000_000))
        with trio.fail_after(5):
            assert await bad.closed_by_server()
        await settled(server, 1)
        assert await good.request(b"ok") == b"ok"
        assert server.stats.errors == {"frame_too_large": 1}
        (line,) = server_records(caplog)
        assert "frame too large" in line
        assert "127.0.0.1:" in line
        await bad.aclose()
        await good.aclose()


async def test_codec_error_closes_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    async with running(echo, codec=triocomm.Lines(max_line=16)) as server:
        bad, good = await connect(server), await connect(server)
        await good.stream.send_all(b"line\n")
        assert await good.stream.receive_some(100) == b"line\n"
        await bad.stream.send_all(b"x" * 64)
        with trio.fail_after(5):
            assert await bad.closed_by_server()
        await settled(server, 1)
        await good.stream.send_all(b"again\n")
        assert await good.stream.receive_some(100) == b"again\n"
        assert server.stats.errors == {"frame_too_large": 1}
        assert len(server_records(caplog)) == 1
        await bad.aclose()
        await good.aclose()


class _StrictCodec:
    """LengthPrefixed, but a payload starting with '!' is a protocol violation."""

    def encode(self, message: bytes) -> bytes:
        return frame(message)

    def decoder(self) -> Any:
        inner = CODEC.decoder()

        class Strict:
            @property
            def buffered(self) -> int:
                return inner.buffered

            def feed(self, data: Any) -> list[bytes]:
                messages = inner.feed(data)
                for m in messages:
                    if m.startswith(b"!"):
                        raise triocomm.ProtocolError(f"forbidden message {m!r}")
                return messages

        return Strict()


async def test_protocol_error_is_logged_as_bad_input(caplog: pytest.LogCaptureFixture) -> None:
    async with running(echo, codec=_StrictCodec()) as server:
        bad, good = await connect(server), await connect(server)
        await bad.send(b"!evil")
        with trio.fail_after(5):
            assert await bad.closed_by_server()
        await settled(server, 1)
        assert await good.request(b"nice") == b"nice"
        assert server.stats.errors == {"protocol": 1}
        (line,) = server_records(caplog, logging.WARNING)
        assert "bad input" in line
        assert "forbidden message" in line
        await bad.aclose()
        await good.aclose()


async def test_peer_vanishing_mid_request_is_counted_as_lost() -> None:
    async with running(echo) as server:
        client = await connect(server)
        await client.stream.send_all(frame(b"complete request")[:8])
        await client.aclose()
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.01)
        assert server.stats.errors == {"connection_lost": 1}


# -- max_connections -------------------------------------------------------------


async def test_at_the_limit_the_longest_idle_keepalive_connection_is_evicted() -> None:
    async with running(echo, max_connections=2) as server:
        oldest = await connect(server)
        assert await oldest.request(b"1") == b"1"
        newer = await connect(server)
        assert await newer.request(b"2") == b"2"
        third = await connect(server)
        with trio.fail_after(5):
            assert await third.request(b"3") == b"3"
            assert await oldest.closed_by_server()
        assert await newer.request(b"still") == b"still"
        assert server.stats.connections_open == 2
        for client in (oldest, newer, third):
            await client.aclose()


class Holding:
    """An echo handler that holds one request until released."""

    def __init__(self, held: bytes) -> None:
        self.held = held
        self.entered = trio.Event()
        self.release = trio.Event()

    async def __call__(self, request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == self.held:
            self.entered.set()
            await self.release.wait()
        return request


async def test_a_connection_with_half_a_request_is_never_evicted() -> None:
    # Its read waits for the rest of the request (so it has "gone quiet"),
    # but bytes of a request are buffered: closing it would lose them.
    async with running(echo, max_connections=1) as server:
        first = await connect(server)
        assert await first.request(b"one") == b"one"
        whole = frame(b"two")
        await first.stream.send_all(whole[:5])  # the header and one byte
        await trio.sleep(0.1)  # the service has read them and waits for more
        second = await connect(server)  # completes in the kernel's backlog
        await second.send(b"queued")
        await trio.sleep(0.2)
        assert server.stats.connections_total == 1  # the first was not evicted
        await first.stream.send_all(whole[5:])
        assert await first.receive() == [b"two"]
        with trio.fail_after(5):
            # Idle now, the first makes room for the second.
            assert await second.receive() == [b"queued"]
            assert await first.closed_by_server()
        await first.aclose()
        await second.aclose()


async def test_a_connection_becomes_evictable_only_when_its_read_must_wait() -> None:
    # A keep-alive connection whose next request is already in its socket is
    # not idle: the service makes it evictable only when its read finds
    # nothing and waits (and a round that finds its request costs no
    # bookkeeping; a woken one leaves the list when the service next looks).
    class Registrations(OrderedDict):  # type: ignore[type-arg]
        def __init__(self) -> None:
            super().__init__()
            self.made = 0

        def __setitem__(self, key: Any, value: Any) -> None:
            if key not in self:
                self.made += 1
            super().__setitem__(key, value)

    handler = Holding(b"hold")

    async def until_waiting(order: Registrations) -> None:
        with trio.fail_after(5):
            while not order:
                await trio.sleep(0.01)

    async with running(handler) as server:
        order = server._keepalive = Registrations()
        client = await connect(server)
        assert await client.request(b"1") == b"1"
        await until_waiting(order)  # between requests, waiting: evictable
        assert order.made == 1
        await client.send(b"hold")
        with trio.fail_after(5):
            await handler.entered.wait()
        # Busy: not evictable; the service's look drops it from the list.
        assert server._evictable() is None
        assert not order
        await client.send(b"next")  # in the service's socket before its next read
        await trio.sleep(0.05)
        handler.release.set()
        assert await client.receive(2) == [b"hold", b"next"]
        await until_waiting(order)
        # The read after "hold" found "next" there: no registration for it.
        assert order.made == 2
        await client.aclose()


async def test_connections_stay_within_cpython_shared_instance_keys() -> None:
    # CPython lets instances of a class share one key table while each holds
    # at most 30 attributes; one more gives every connection a dict of its
    # own. Measured with one attribute too many: 8,007 instead of 6,716
    # bytes per idle keep-alive connection (docs/benchmark-log.md, item 11).
    seen: list[Connection[bytes, bytes]] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        seen.append(conn)
        return request

    async with running(handler) as server:
        client = await connect(server)
        for i in range(3):  # each wait between requests sets the watchdog's fields
            assert await client.request(b"%d" % i) == b"%d" % i
            await trio.sleep(0.01)
        await client.aclose()
    async with triocomm.open_client() as tc_client, running(echo) as server:
        target = triocomm.Target(LOOPBACK, server.port, CODEC)
        for _ in range(3):
            await tc_client.run(target, lambda conn: _keep(conn, seen))
    assert len(seen) == 6
    for conn in seen:
        assert len(vars(conn)) <= 30, sorted(vars(conn))


async def _keep(conn: Connection[bytes, bytes], seen: list[Connection[bytes, bytes]]) -> None:
    await conn.send(b"x")
    assert await conn.receive() == b"x"
    seen.append(conn)


async def test_at_the_limit_with_nobody_idle_accepting_pauses_until_a_slot_frees() -> None:
    handler = Holding(b"slow")
    entered, release = handler.entered, handler.release
    async with running(handler, max_connections=1) as server:
        busy = await connect(server)
        await busy.send(b"slow")
        await entered.wait()
        waiting = await connect(server)  # completes in the kernel's backlog
        await waiting.send(b"queued")
        await trio.sleep(0.2)
        assert server.stats.connections_total == 1
        assert server.stats.connections_open == 1
        release.set()
        assert await busy.receive() == [b"slow"]
        await busy.aclose()
        with trio.fail_after(5):
            assert await waiting.receive() == [b"queued"]
        assert server.stats.connections_total == 2
        await waiting.aclose()


# -- serve_connections -----------------------------------------------------------


async def test_serve_connections_push_and_stream() -> None:
    async def handler(conn: Connection[bytes, bytes]) -> None:
        await conn.send(b"welcome")  # server speaks first
        async for message in conn:
            await conn.send_many([message, message])
        await conn.send(b"bye")  # unreachable: the peer closed

    async with running(handler, entry=triocomm.serve_connections) as server:
        client = await connect(server)
        assert await client.receive() == [b"welcome"]
        await client.send(b"x")
        assert await client.receive(2) == [b"x", b"x"]
        await client.aclose()
        with trio.fail_after(5):
            while server.stats.connections_open:
                await trio.sleep(0.01)
        assert server.stats.sessions == 1
        assert not server.stats.errors


async def test_serve_connections_handler_exception_is_isolated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(conn: Connection[bytes, bytes]) -> None:
        async for message in conn:
            if message == b"boom":
                raise ValueError("bad day")
            await conn.send(message)

    async with running(handler, entry=triocomm.serve_connections) as server:
        victim, other = await connect(server), await connect(server)
        await victim.send(b"boom")
        with trio.fail_after(5):
            assert await victim.closed_by_server()
        await settled(server, 1)
        assert await other.request(b"ok") == b"ok"
        assert server.stats.errors == {"handler": 1}
        (line,) = server_records(caplog)
        assert "bad day" in line
        assert "127.0.0.1:" in line
        await victim.aclose()
        await other.aclose()


async def test_a_timeout_of_the_handlers_own_backend_is_a_handler_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(conn: Connection[bytes, bytes]) -> None:
        await conn.receive()
        raise triocomm.CommTimeout("first_response", 1.0, "backend:6379")

    async with running(handler, entry=triocomm.serve_connections) as server:
        client = await connect(server)
        await client.send(b"x")
        with trio.fail_after(5):
            assert await client.closed_by_server()
        await settled(server, 0)
        assert server.stats.errors == {"handler": 1}
        await client.aclose()


# -- structured concurrency ------------------------------------------------------


async def test_nothing_outlives_the_service(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], sock_dir: str
) -> None:
    server_context, client_context = tls_contexts
    before = open_fds()
    async with (
        running(echo, ssl_context=server_context) as tls_server,
        running(echo, path=os.path.join(sock_dir, "a.sock")) as unix_server,
    ):
        clients = [await tls_connect(tls_server, client_context) for _ in range(3)]
        clients.append(RawClient(await trio.open_unix_socket(unix_server.addresses[0])))
        for client in clients:
            assert await client.request(b"hi") == b"hi"
        for client in clients:
            await client.aclose()
    assert open_fds() == before


# Idle tests wait far longer than the default keep-alive limits; switch them off.
PATIENT = ServerTimeouts(first_request=None, keepalive=None, inactivity=None)


# -- idle detection --------------------------------------------------------------


async def test_read_idle_fires_every_period_and_io_restarts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[Idle, float]] = []
    t0 = trio.current_time()

    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        calls.append((status, round(trio.current_time() - t0, 3)))

    async with running(echo, idle={Idle.READ: 5.0}, on_idle=on_idle, timeouts=PATIENT) as server:
        client = await connect(server)
        await trio.sleep(12)
        assert await client.request(b"x") == b"x"  # at t=12: read, so idle restarts
        await trio.sleep(11.5)
        assert calls == [(Idle.READ, 5), (Idle.READ, 10), (Idle.READ, 17), (Idle.READ, 22)]
        await client.aclose()


async def test_both_idle_counts_from_the_later_of_read_and_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[Idle, float]] = []
    t0 = trio.current_time()

    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        calls.append((status, round(trio.current_time() - t0, 3)))

    async def handler(conn: Connection[bytes, bytes]) -> None:
        await conn.receive()
        await trio.sleep(5)
        await conn.send(b"late")  # the first write, 5 s after the read
        await trio.sleep_forever()

    periods = {Idle.READ: 4.0, Idle.WRITE: 4.0, Idle.BOTH: 4.0}
    async with running(
        handler, entry=triocomm.serve_connections, idle=periods, on_idle=on_idle, timeouts=PATIENT
    ) as server:
        client = await connect(server)
        await trio.sleep(1)
        await client.send(b"go")  # read at t=1, write at t=6
        await trio.sleep(9.5)
        assert sorted(calls, key=lambda c: (c[1], c[0].value)) == [
            (Idle.WRITE, 4),  # nothing written since the connection opened
            (Idle.BOTH, 5),  # 4 s after the read at t=1
            (Idle.READ, 5),
            (Idle.READ, 9),
            (Idle.BOTH, 10),  # 4 s after the write at t=6
            (Idle.WRITE, 10),
        ]
        await client.aclose()


async def test_a_slow_write_in_progress_is_not_write_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """netty#6150: a large write to a slow reader must not look write-idle."""
    calls: list[float] = []
    written: list[float] = []
    t0 = trio.current_time()
    big = b"z" * (32 * 1024 * 1024)

    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        calls.append(trio.current_time() - t0)

    async def handler(conn: Connection[bytes, bytes]) -> None:
        await conn.receive()
        written.append(trio.current_time() - t0)
        await conn.send(big)
        written.append(trio.current_time() - t0)
        await trio.sleep_forever()

    async with running(
        handler,
        entry=triocomm.serve_connections,
        idle={Idle.WRITE: 5.0},
        on_idle=on_idle,
        timeouts=PATIENT,
        codec=LengthPrefixed(max_frame=len(big)),
    ) as server:
        client = await connect(server)
        await client.send(b"go")
        received = 0
        with trio.fail_after(1000):
            while received < len(big) + 4:
                received += len(await client.stream.receive_some(256 * 1024))
                await trio.sleep(1)  # a slow reader: 256 KiB a second
        await trio.sleep(12)
        started, finished = written
        assert finished - started > 20  # the write really was slow
        during = [t for t in calls if started < t < finished]
        assert during == []
        # Then write-idle every 5 s. How many periods pass before the reader
        # has drained the kernel's socket buffers depends on their (autotuned)
        # size, so only the spacing is fixed, not the count.
        after = [round(t - finished) for t in calls if t >= finished]
        assert len(after) >= 2
        assert after == [5 * (i + 1) for i in range(len(after))]
        await client.aclose()


async def test_a_slow_callback_delays_nobody_and_never_piles_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: dict[bytes, list[float]] = {b"slow": [], b"quick": []}
    cancelled = trio.Event()
    t0 = trio.current_time()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conn.context["name"] = request
        return request

    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        name = conn.context["name"]
        calls[name].append(round(trio.current_time() - t0))
        if name == b"slow":
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

    async with running(handler, idle={Idle.READ: 5.0}, on_idle=on_idle, timeouts=PATIENT) as server:
        slow, quick = await connect(server), await connect(server)
        assert await slow.request(b"slow") == b"slow"
        assert await quick.request(b"quick") == b"quick"
        await trio.sleep(21)
        assert calls == {b"slow": [5], b"quick": [5, 10, 15, 20]}
        # The connection's callback ends with the connection.
        await slow.aclose()
        with trio.fail_after(1):
            await cancelled.wait()
        await quick.aclose()


async def test_on_idle_may_close_the_connection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        await conn.send(b"bye")
        await conn.aclose()

    async with running(echo, idle={Idle.READ: 30.0}, on_idle=on_idle, timeouts=PATIENT) as server:
        client = await connect(server)
        assert await client.request(b"hi") == b"hi"
        assert await client.receive() == [b"bye"]
        assert await client.closed_by_server()
        await settled(server)
        assert not server.stats.errors
        assert server_records(caplog) == []
        await client.aclose()


async def test_a_failing_on_idle_closes_only_its_connection(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        if conn.context.get("doomed"):
            raise RuntimeError("heartbeat bug")

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        conn.context["doomed"] = request == b"doomed"
        return request

    async with running(handler, idle={Idle.READ: 5.0}, on_idle=on_idle, timeouts=PATIENT) as server:
        doomed, other = await connect(server), await connect(server)
        assert await doomed.request(b"doomed") == b"doomed"
        assert await other.request(b"other") == b"other"
        await trio.sleep(6)
        assert await doomed.closed_by_server()
        assert await other.request(b"still") == b"still"
        await settled(server, 1)
        assert server.stats.errors == {"on_idle": 1}
        (line,) = server_records(caplog)
        assert "on_idle(READ) raised" in line
        assert "heartbeat bug" in line
        assert "127.0.0.1:" in line
        await doomed.aclose()
        await other.aclose()


# -- shutdown --------------------------------------------------------------------


async def test_shutdown_stops_accepting_closes_idle_and_finishes_in_flight() -> None:
    entered, release = trio.Event(), trio.Event()
    served, shut = trio.Event(), trio.Event()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"slow":
            entered.set()
            await release.wait()
        return request

    async def run(task_status: trio.TaskStatus[triocomm.Server]) -> None:
        await triocomm.serve(handler, 0, host=LOOPBACK, codec=CODEC, task_status=task_status)
        served.set()

    async def shutdown(server: triocomm.Server) -> None:
        await server.shutdown(grace=30)
        shut.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server: triocomm.Server = await nursery.start(run)
            port = server.port
            idle = await connect(server)
            assert await idle.request(b"done") == b"done"
            silent = await connect(server)  # accepted, no request yet
            busy = await connect(server)
            await busy.send(b"slow", b"pipelined")
            await entered.wait()
            assert server.stats.connections_open == 3
            nursery.start_soon(shutdown, server)
            assert await idle.closed_by_server()
            assert await silent.closed_by_server()
            assert port is not None
            with pytest.raises(OSError):
                await trio.open_tcp_stream(LOOPBACK, port)
            assert server.shutting_down
            assert not shut.is_set()
            release.set()
            # Requests already received are answered before the connection closes.
            assert await busy.receive(2) == [b"slow", b"pipelined"]
            assert await busy.closed_by_server()
            await shut.wait()
            assert served.is_set()
            assert server.stats.connections_open == 0
            for client in (idle, silent, busy):
                await client.aclose()


async def test_shutdown_cancels_what_is_left_when_grace_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = trio.Event()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with running(handler, timeouts=PATIENT) as server:
        client = await connect(server)
        await client.send(b"never answered")
        await trio.sleep(1)
        start = trio.current_time()
        await server.shutdown(grace=3.0)
        assert trio.current_time() - start == pytest.approx(3.0)
        assert cancelled.is_set()
        assert await client.closed_by_server()
        assert server.stats.connections_open == 0
        await client.aclose()


async def test_serve_connections_handler_gets_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(conn: Connection[bytes, bytes]) -> None:
        while True:
            await conn.send(b"tick")
            await trio.sleep(1)
            if server.shutting_down:
                await conn.send(b"goodbye")
                return

    async with running(handler, entry=triocomm.serve_connections, timeouts=PATIENT) as server:
        client = await connect(server)
        assert await client.receive(2) == [b"tick", b"tick"]
        start = trio.current_time()
        await server.shutdown(grace=10)
        assert trio.current_time() - start <= 1
        messages: list[bytes] = []
        with pytest.raises(EOFError):
            while True:
                messages += await client.receive()
        assert messages[-1] == b"goodbye"
        assert set(messages[:-1]) <= {b"tick"}
        await client.aclose()


async def test_shutdown_with_no_connections_returns_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(echo) as server:
        start = trio.current_time()
        await server.shutdown(grace=100)
        await server.shutdown(grace=100)  # idempotent
        assert trio.current_time() == start


async def test_cancelling_serve_stops_everything_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = open_fds()
    entered = trio.Event()
    handler_cancelled = trio.Event()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(triocomm.serve, handler, 0, host=LOOPBACK, codec=CODEC)
            )
            busy, silent = await connect(server), await connect(server)
            await busy.send(b"stuck")
            await entered.wait()
            nursery.cancel_scope.cancel()
        assert handler_cancelled.is_set()
        assert await busy.closed_by_server()
        assert await silent.closed_by_server()
        await busy.aclose()
        await silent.aclose()
    assert open_fds() == before
    assert server_records(caplog, logging.WARNING) == []


async def test_a_handler_that_cancels_the_service_gets_its_reply_out_and_no_more() -> None:
    # The request loop checks for cancellation once a round, at its read:
    # the reply of a handler that cancelled the service is still written,
    # and a request already waiting in the socket is not handled.
    handled: list[bytes] = []
    server_ends: list[trio.SocketStream] = []
    stop_seen = trio.Event()
    next_queued = trio.Event()
    service = trio.CancelScope()

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        handled.append(request)
        assert isinstance(conn.stream, trio.SocketStream)
        server_ends.append(conn.stream)
        stop_seen.set()
        await next_queued.wait()
        service.cancel()
        return request

    async def run_service(task_status: trio.TaskStatus[Server]) -> None:
        with service:
            await triocomm.serve(handler, 0, host=LOOPBACK, codec=CODEC, task_status=task_status)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(run_service)
            client = await connect(server)
            await client.send(b"stop")
            await stop_seen.wait()
            await client.send(b"next")
            queued = array.array("i", [0])
            while queued[0] < len(frame(b"next")):
                fcntl.ioctl(server_ends[0].socket.fileno(), termios.FIONREAD, queued)
                await trio.sleep(0.001)
            next_queued.set()
        assert await client.receive() == [b"stop"]
        assert await client.closed_by_server()
        await client.aclose()
    assert handled == [b"stop"]


async def test_invalid_grace_is_refused() -> None:
    async with running(echo) as server:
        with pytest.raises(ValueError, match="grace"):
            await server.shutdown(grace=-1)


async def test_a_request_racing_shutdown_is_answered_not_lost() -> None:
    server_ends: list[trio.SocketStream] = []

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        assert isinstance(conn.stream, trio.SocketStream)
        server_ends.append(conn.stream)
        return request

    async with running(handler) as server:
        client = await connect(server)
        assert await client.request(b"warm") == b"warm"
        stream = client.stream
        assert isinstance(stream, trio.SocketStream)
        # The worst moment: the request sits in the server's socket buffer,
        # but the connection task still sleeps in its wait for the next
        # request (no I/O poll ran since). A plain write, a busy wait (no
        # checkpoint) until the kernel has queued it on the server's socket,
        # then the synchronous start of shutdown make that moment certain.
        os.write(stream.socket.fileno(), frame(b"racing"))
        queued = array.array("i", [0])
        deadline = time.monotonic() + 5
        while queued[0] == 0 and time.monotonic() < deadline:
            fcntl.ioctl(server_ends[0].socket.fileno(), termios.FIONREAD, queued)
        assert queued[0] == len(frame(b"racing"))
        with trio.CancelScope() as scope:
            scope.cancel()
            await server.shutdown(5)  # begins, then is cancelled at its first wait
        assert server.shutting_down
        with trio.fail_after(5):
            assert await client.receive() == [b"racing"]
            assert await client.closed_by_server()
            await server.shutdown(5)
        assert not server.stats.errors
        await client.aclose()


async def test_idle_tls_connections_close_quietly_on_shutdown_and_eviction(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    server_context, client_context = tls_contexts
    async with running(echo, ssl_context=server_context, max_connections=1) as server:
        first = await tls_connect(server, client_context)
        assert await first.request(b"one") == b"one"
        second = await tls_connect(server, client_context)  # evicts the first
        assert await second.request(b"two") == b"two"
        with trio.fail_after(5):
            assert await first.closed_by_server()
            await server.shutdown(grace=5)
            assert await second.closed_by_server()
        assert not server.stats.errors
        assert server_records(caplog) == []
        await first.aclose()
        await second.aclose()


async def test_idle_timers_of_closed_connections_do_not_pile_up() -> None:
    async def on_idle(conn: Connection[Any, Any], status: Idle) -> None:
        pass  # pragma: no cover - the period is never reached

    async with running(echo, idle={Idle.READ: 3600.0}, on_idle=on_idle) as server:
        for _ in range(600):
            client = await connect(server)
            assert await client.request(b"x") == b"x"
            await client.aclose()
        await settled(server)
        # One alarm per live connection is the cost; a closed connection's
        # alarm is dropped lazily, but never more than about half the heap.
        assert len(server._timers) <= 2 * _SWEEP_MIN + 4
        assert server.stats.connections_total == 600


async def test_serve_connections_at_the_limit_pauses_accepting() -> None:
    async def handler(conn: Connection[bytes, bytes]) -> None:
        async for message in conn:
            await conn.send(message)

    async with running(handler, entry=triocomm.serve_connections, max_connections=1) as server:
        first = await connect(server)
        assert await first.request(b"hello") == b"hello"
        second = await connect(server)
        await second.send(b"queued")
        await trio.sleep(0.2)
        # The first connection is quiet, but a connection handler is never
        # "between requests" for the service: nothing is evicted.
        assert server.stats.connections_total == 1
        await first.aclose()
        with trio.fail_after(5):
            assert await second.receive() == [b"queued"]
        await second.aclose()


async def test_a_keyboard_interrupt_leaves_serve_as_itself() -> None:
    # A Ctrl-C that lands in a connection's task: the caller of serve gets a
    # KeyboardInterrupt, not an exception group holding one.
    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        raise KeyboardInterrupt

    caught: list[BaseException] = []

    async def run_service(task_status: trio.TaskStatus[triocomm.Server]) -> None:
        try:
            await triocomm.serve(handler, 0, host="127.0.0.1", codec=CODEC, task_status=task_status)
        except BaseException as exc:
            caught.append(exc)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_service)
        client = RawClient(await trio.open_tcp_stream("127.0.0.1", server.port))
        with trio.fail_after(5):
            await client.send(b"ctrl-c")
            while not caught:
                await trio.sleep(0.01)
        await client.aclose()
    assert type(caught[0]) is KeyboardInterrupt
