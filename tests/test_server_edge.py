"""A service at the edge of a network: PROXY headers, admission, and listeners given to it.

Every client is a raw Trio stream writing headers and frames by hand. The
parser itself is fuzzed in ``test_proxy.py``; here the headers travel over
real loopback sockets (whole, split, trickled, with the first request in the
same segment).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm import Connection, LengthPrefixed, Server, ServerTimeouts
from triocomm._proxy import V2_SIGNATURE

CODEC = LengthPrefixed()


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = socket.has_ipv6 and _ipv6_loopback_works()
LOOPBACK = "127.0.0.1"


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def v1(source: str, sport: int, destination: str = "10.0.0.1", dport: int = 7000) -> bytes:
    family = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {family} {source} {destination} {sport} {dport}\r\n".encode()


def v2(source: str, sport: int, *, command: int = 1, tlvs: bytes = b"") -> bytes:
    a = ipaddress.ip_address(source)
    b = ipaddress.ip_address("10.0.0.1" if a.version == 4 else "fd00::1")
    body = a.packed + b.packed + struct.pack("!HH", sport, 7000) + tlvs
    family = 0x11 if a.version == 4 else 0x21
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class Seen:
    """What the handler saw of each connection."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.remote: list[object] = []
        self.proxied_by: list[object] = []
        self.peers: list[str] = []
        self.fields: list[set[str]] = []

    async def handler(self, request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        self.requests.append(request)
        self.remote.append(conn.remote_address)
        self.proxied_by.append(conn.proxied_by)
        self.peers.append(conn.peer)
        self.fields.append(set(vars(conn)))
        return request


@asynccontextmanager
async def running(handler: Callable[..., Awaitable[Any]], **options: Any) -> AsyncIterator[Server]:
    options.setdefault("codec", CODEC)
    if "listeners" not in options and "path" not in options:
        options.setdefault("host", LOOPBACK)
        options.setdefault("port", 0)
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(partial(triocomm.serve, handler, **options))
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def read_replies(stream: trio.abc.Stream, count: int) -> list[bytes]:
    data = b""
    replies: list[bytes] = []
    while len(replies) < count:
        if len(data) >= 4 and len(data) >= 4 + struct.unpack("!I", data[:4])[0]:
            size = struct.unpack("!I", data[:4])[0]
            replies.append(data[4 : 4 + size])
            data = data[4 + size :]
            continue
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"closed after {replies!r} and {data!r}")
        data += chunk
    assert not data
    return replies


async def read_reply(stream: trio.abc.Stream) -> bytes:
    (reply,) = await read_replies(stream, 1)
    return reply


async def closed_by_server(stream: trio.abc.Stream) -> bool:
    """True when the server closed (EOF or reset) without sending anything."""
    try:
        with trio.fail_after(30):
            data = await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return True
    return data == b""


async def settled(server: Server, open_connections: int = 0) -> None:
    """Wait until the service's connection tasks caught up with the closes."""
    with trio.fail_after(5):
        while server.stats.connections_open != open_connections:
            await trio.sleep(0.005)


async def send_quietly(stream: trio.abc.Stream, data: bytes) -> None:
    # The service may have closed already (that is what the test checks).
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


# -- PROXY protocol --------------------------------------------------------------


@pytest.mark.parametrize("header", [v1("192.0.2.7", 51234), v2("192.0.2.7", 51234)])
async def test_the_client_named_by_the_header_is_the_remote_address(header: bytes) -> None:
    seen = Seen()
    async with (
        running(seen.handler, proxy_protocol=True) as server,
        await trio.open_tcp_stream(LOOPBACK, server.port) as stream,
    ):
        # The first request rides in the same segment as the header.
        await stream.send_all(header + frame(b"one") + frame(b"two"))
        assert await read_replies(stream, 2) == [b"one", b"two"]
        balancer = stream.socket.getsockname()
    assert seen.requests == [b"one", b"two"]
    assert seen.remote == [("192.0.2.7", 51234)] * 2
    assert seen.proxied_by == [balancer] * 2
    assert seen.peers == ["192.0.2.7:51234"] * 2
    assert not server.stats.errors


async def test_an_ipv6_client_behind_an_ipv4_balancer() -> None:
    seen = Seen()
    async with (
        running(seen.handler, proxy_protocol=True) as server,
        await trio.open_tcp_stream(LOOPBACK, server.port) as stream,
    ):
        await stream.send_all(v2("2001:db8::5", 4242, tlvs=b"\x05\x00\x02ab") + frame(b"x"))
        assert await read_reply(stream) == b"x"
    assert seen.remote == [("2001:db8::5", 4242, 0, 0)]
    assert seen.peers == ["[2001:db8::5]:4242"]


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", v2("192.0.2.9", 1, command=0)])
async def test_a_header_naming_no_client_leaves_the_socket_address(header: bytes) -> None:
    # v1 UNKNOWN, v2 LOCAL (a balancer's health check): the balancer is the peer.
    seen = Seen()
    async with (
        running(seen.handler, proxy_protocol=True) as server,
        await trio.open_tcp_stream(LOOPBACK, server.port) as stream,
    ):
        await stream.send_all(header + frame(b"ping"))
        assert await read_reply(stream) == b"ping"
        balancer = stream.socket.getsockname()
    assert seen.remote == [balancer]
    assert seen.proxied_by == [balancer]


async def test_without_the_protocol_nothing_is_proxied() -> None:
    seen = Seen()
    async with (
        running(seen.handler) as server,
        await trio.open_tcp_stream(LOOPBACK, server.port) as stream,
    ):
        await stream.send_all(frame(b"plain"))
        assert await read_reply(stream) == b"plain"
        me = stream.socket.getsockname()
    assert seen.remote == [me]
    assert seen.proxied_by == [None]
    # Memory: a connection without the protocol has no field for it.
    assert "_proxied_by" not in seen.fields[0]


@pytest.mark.parametrize("header", [v1("192.0.2.7", 51234), v2("192.0.2.7", 51234)])
async def test_a_header_split_at_every_byte(header: bytes) -> None:
    seen = Seen()
    async with running(seen.handler, proxy_protocol=True) as server:
        for split in range(1, len(header)):
            async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
                stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await stream.send_all(header[:split])
                await trio.testing.wait_all_tasks_blocked()  # the service takes that part
                await stream.send_all(header[split:] + frame(b"%d" % split))
                assert await read_reply(stream) == b"%d" % split
        await settled(server)
    assert seen.remote == [("192.0.2.7", 51234)] * (len(header) - 1)
    assert not server.stats.errors


@pytest.mark.parametrize(
    "data",
    [
        frame(b"no header at all"),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + frame(b"x"),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n" + frame(b"x"),
        b"\x00" * 200,
        b"PROXY " + b"A" * 200,
        V2_SIGNATURE + b"\x21\x11\xff\xff" + b"\x00" * 100,  # past the size bound
    ],
    ids=["none", "lf", "port", "zeros", "long-v1", "big-v2"],
)
async def test_a_bad_header_closes_the_connection_before_the_handler(
    data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    async with (
        running(seen.handler, proxy_protocol=True) as server,
        await trio.open_tcp_stream(LOOPBACK, server.port) as stream,
    ):
        await send_quietly(stream, data)
        assert await closed_by_server(stream)
        await settled(server)
    assert seen.requests == []
    assert server.stats.errors == {"proxy_protocol": 1}
    assert server.stats.sessions == 0
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "bad PROXY header" in line
    assert "127.0.0.1:" in line


@pytest.mark.parametrize("header", [v1("192.0.2.7", 51234), v2("192.0.2.7", 51234)])
async def test_a_truncated_header_closes(header: bytes) -> None:
    seen = Seen()
    async with running(seen.handler, proxy_protocol=True) as server:
        for cut in (0, 1, len(header) // 2, len(header) - 1):
            stream = await trio.open_tcp_stream(LOOPBACK, server.port)
            async with stream:
                await stream.send_all(header[:cut])
                await stream.send_eof()
                assert await closed_by_server(stream)
        await settled(server)
    assert seen.requests == []
    assert server.stats.errors == {"proxy_protocol": 4}


async def test_a_trickled_header_is_cut_off_by_first_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = Seen()
    header = v1("192.0.2.7", 51234)
    async with running(
        seen.handler, proxy_protocol=True, timeouts=ServerTimeouts(first_request=5.0)
    ) as server:
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            started = trio.current_time()
            closed = False
            for byte in header:  # one byte a second: each read makes progress
                await send_quietly(stream, bytes([byte]))
                with trio.move_on_after(1.0):
                    closed = await closed_by_server(stream)
                if closed:
                    break
            assert closed
            # Cut off when the whole header was due, not when it stopped moving.
            assert 5.0 <= trio.current_time() - started < 6.0
        await settled(server)
    assert seen.requests == []
    assert server.stats.errors == {"proxy_protocol": 1}


async def test_a_slow_first_request_after_a_prompt_header_is_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen = Seen()
    async with running(
        seen.handler, proxy_protocol=True, timeouts=ServerTimeouts(first_request=5.0)
    ) as server:
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(v2("192.0.2.7", 1))
            assert await closed_by_server(stream)
        await settled(server)
    assert server.stats.errors == {"timeout": 1}


async def test_proxy_protocol_over_tls(server_ssl_context: Any, client_ssl_context: Any) -> None:
    # The header comes first, in clear, as HAProxy sends it; then the handshake.
    seen = Seen()
    async with running(seen.handler, proxy_protocol=True, ssl_context=server_ssl_context) as server:
        tcp = await trio.open_tcp_stream(LOOPBACK, server.port)
        await tcp.send_all(v1("192.0.2.7", 51234))
        stream = trio.SSLStream(tcp, client_ssl_context, server_hostname="localhost")
        async with stream:
            await stream.send_all(frame(b"secure"))
            assert await read_reply(stream) == b"secure"
    assert seen.remote == [("192.0.2.7", 51234)]


async def test_proxy_protocol_over_a_unix_socket(short_tmp: str) -> None:
    seen = Seen()
    path = f"{short_tmp}/s"
    async with (
        running(seen.handler, path=path, proxy_protocol=True),
        await trio.open_unix_socket(path) as stream,
    ):
        await stream.send_all(v1("192.0.2.7", 51234) + frame(b"u"))
        assert await read_reply(stream) == b"u"
    assert seen.remote == [("192.0.2.7", 51234)]


async def test_serve_connections_takes_the_options_too() -> None:
    got: list[object] = []

    async def handler(conn: Connection[bytes, bytes]) -> None:
        got.append(conn.remote_address)
        await conn.send(await conn.receive())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                triocomm.serve_connections,
                handler,
                0,
                host=LOOPBACK,
                codec=CODEC,
                proxy_protocol=True,
                deny=["198.51.100.0/24"],
            )
        )
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(v2("192.0.2.1", 9) + frame(b"c"))
            assert await read_reply(stream) == b"c"
        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(v2("198.51.100.1", 9) + frame(b"c"))
            assert await closed_by_server(stream)
        await settled(server)
        assert server.stats.errors == {"denied": 1}
        nursery.cancel_scope.cancel()
    assert got == [("192.0.2.1", 9)]


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
async def test_over_ipv6_the_balancer_address_is_a_v6_one() -> None:
    seen = Seen()
    async with (
        running(seen.handler, host="::1", proxy_protocol=True) as server,
        await trio.open_tcp_stream("::1", server.port) as stream,
    ):
        await stream.send_all(v1("192.0.2.7", 5) + frame(b"6"))
        assert await read_reply(stream) == b"6"
    assert seen.remote == [("192.0.2.7", 5)]
    (by,) = seen.proxied_by
    assert isinstance(by, tuple)
    assert by[0] == "::1"


async def test_proxy_protocol_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="proxy_protocol"):
        await triocomm.serve(Seen().handler, 0, codec=CODEC, proxy_protocol="yes")  # type: ignore[arg-type]


# -- admission ---------------------------------------------------------------------


async def open_from(source: str, port: int) -> trio.SocketStream:
    """A TCP connection to the service from the loopback address ``source``."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect((LOOPBACK, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def served(stream: trio.abc.Stream, payload: bytes = b"hi") -> bool:
    """True if the service answers a request on ``stream``, False if it closed it."""
    async with stream:
        await send_quietly(stream, frame(payload))
        try:
            return await read_reply(stream) == payload
        except (EOFError, trio.BrokenResourceError):
            return False


async def test_allow_and_deny_by_the_socket_address() -> None:
    seen = Seen()
    async with running(
        seen.handler, allow=["127.0.0.0/29"], deny=[ipaddress.ip_address("127.0.0.2")]
    ) as server:
        assert await served(await open_from("127.0.0.1", server.port))
        assert not await served(await open_from("127.0.0.2", server.port))  # deny wins
        assert not await served(await open_from("127.0.0.9", server.port))  # not allowed
        assert await served(await open_from("127.0.0.3", server.port))
        await settled(server)
    assert server.stats.errors == {"denied": 2}
    assert server.stats.sessions == 2
    assert seen.proxied_by == [None, None]


async def test_deny_applies_to_the_proxied_address() -> None:
    seen = Seen()
    async with running(
        seen.handler, proxy_protocol=True, deny=["192.0.2.0/24", "2001:db8::/32"]
    ) as server:
        for header, ok in [
            (v1("192.0.2.7", 1), False),
            (v2("198.51.100.7", 1), True),
            (v2("2001:db8::1", 1), False),
            (v2("2001:db9::1", 1), True),
            (b"PROXY UNKNOWN\r\n", True),  # no client named: the balancer's own address
        ]:
            stream = await trio.open_tcp_stream(LOOPBACK, server.port)
            await stream.send_all(header)
            assert await served(stream) is ok, header
        await settled(server)
    assert server.stats.errors == {"denied": 2}


async def test_a_unix_socket_peer_is_never_filtered(short_tmp: str) -> None:
    path = f"{short_tmp}/s"
    async with running(
        Seen().handler, path=path, allow=["10.0.0.0/8"], max_connections_per_ip=1
    ) as server:
        first = await trio.open_unix_socket(path)
        assert await served(await trio.open_unix_socket(path))
        await first.aclose()
        await settled(server)
    assert not server.stats.errors


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
async def test_an_ipv4_client_of_a_dual_stack_socket_is_judged_as_ipv4() -> None:
    # The socket shows the client as ::ffff:127.0.0.2; the rules name 127.0.0.2.
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    sock.listen()
    seen = Seen()
    async with running(seen.handler, listeners=[sock], deny=["127.0.0.2"]) as server:
        assert not await served(await open_from("127.0.0.2", server.port))
        assert await served(await open_from("127.0.0.3", server.port))
        await settled(server)
    assert server.stats.errors == {"denied": 1}
    assert seen.remote[0][0] == "::ffff:127.0.0.3"  # type: ignore[index]


async def test_max_connections_per_ip() -> None:
    async with running(Seen().handler, max_connections_per_ip=2) as server:
        one = await open_from("127.0.0.1", server.port)
        two = await open_from("127.0.0.1", server.port)
        await one.send_all(frame(b"1"))
        await two.send_all(frame(b"2"))
        assert await read_reply(one) == b"1"
        assert await read_reply(two) == b"2"
        assert not await served(await open_from("127.0.0.1", server.port))
        assert await served(await open_from("127.0.0.4", server.port))  # another address
        await one.aclose()
        await settled(server, 1)
        assert await served(await open_from("127.0.0.1", server.port))  # room again
        await two.aclose()
        await settled(server)
    assert server.stats.errors == {"per_ip_limit": 1}


async def test_max_connections_per_ip_counts_proxied_clients() -> None:
    async with running(Seen().handler, proxy_protocol=True, max_connections_per_ip=1) as server:
        held = []
        for client in ("192.0.2.1", "192.0.2.2"):
            stream = await trio.open_tcp_stream(LOOPBACK, server.port)
            await stream.send_all(v2(client, 1) + frame(b"x"))
            assert await read_reply(stream) == b"x"
            held.append(stream)
        again = await trio.open_tcp_stream(LOOPBACK, server.port)
        await again.send_all(v1("192.0.2.1", 2))
        assert not await served(again)
        for stream in held:
            await stream.aclose()
        await settled(server)
    assert server.stats.errors == {"per_ip_limit": 1}


async def test_per_ip_counts_are_given_back_on_every_end(
    server_ssl_context: Any, client_ssl_context: Any
) -> None:
    """With a limit of one connection, a new connection is admitted after each way one ends."""

    async def handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
        if request == b"raise":
            raise RuntimeError("the handler fails")
        if request == b"close":
            await conn.aclose()
        return request

    async with running(
        handler,
        max_connections_per_ip=1,
        timeouts=ServerTimeouts(handshake=0.05, first_request=None, keepalive=None),
    ) as server:

        async def end(how: str) -> None:
            stream = await open_from("127.0.0.1", server.port)
            if how == "clean":
                assert await served(stream)
            elif how in ("raise", "close"):
                assert not await served(stream, how.encode())
            elif how == "bad frame":
                await stream.send_all(b"\xff\xff\xff\xff")
                assert await closed_by_server(stream)
                await stream.aclose()
            elif how == "reset":
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await stream.aclose()
            await settled(server)

        for how in ("clean", "raise", "close", "bad frame", "reset"):
            await end(how)
        # A TLS handshake that fails, on a TLS service with the same limit.
        assert await served(await open_from("127.0.0.1", server.port))
    async with running(
        handler, max_connections_per_ip=1, ssl_context=server_ssl_context
    ) as tls_server:
        for _ in range(2):
            stream = await open_from("127.0.0.1", tls_server.port)
            await stream.send_all(b"not a TLS hello" * 10)
            assert await closed_by_server(stream)
            await stream.aclose()
            await settled(tls_server)
        tls = trio.SSLStream(
            await open_from("127.0.0.1", tls_server.port),
            client_ssl_context,
            server_hostname="localhost",
        )
        assert await served(tls)
        await settled(tls_server)
    assert server.stats.errors == {"handler": 1, "frame_too_large": 1, "connection_lost": 1}
    assert tls_server.stats.errors == {"handshake": 2}
    assert server._admission is not None
    assert server._admission.connections_from("127.0.0.1") == 0


async def test_per_ip_counts_are_given_back_at_shutdown_and_on_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(
        Seen().handler, max_connections_per_ip=1, timeouts=ServerTimeouts(first_request=5.0)
    ) as server:
        admission = server._admission
        assert admission is not None
        quiet = await open_from("127.0.0.1", server.port)
        assert await closed_by_server(quiet)  # first_request ran out
        await quiet.aclose()
        await settled(server)
        assert admission.connections_from("127.0.0.1") == 0
        held = await open_from("127.0.0.1", server.port)
        await held.send_all(frame(b"x"))
        assert await read_reply(held) == b"x"
        assert admission.connections_from("127.0.0.1") == 1
        await server.shutdown()
        assert admission.connections_from("127.0.0.1") == 0
        await held.aclose()
    assert server.stats.errors == {"timeout": 1}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"allow": "10.0.0.0/8"}, TypeError),  # a string, not a list of them
        ({"deny": [42]}, TypeError),
        ({"deny": ["10.0.0.1/8"]}, ValueError),  # host bits set
        ({"allow": ["nonsense"]}, ValueError),
        ({"max_connections_per_ip": 0}, ValueError),
        ({"max_connections_per_ip": 1.5}, TypeError),
        ({"max_connections_per_ip": True}, TypeError),
    ],
)
async def test_bad_admission_options(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        await triocomm.serve(Seen().handler, 0, codec=CODEC, **options)


# -- listeners given to the service ------------------------------------------------


def listening_socket(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    return sock


async def test_serves_on_a_given_socket_and_closes_it_at_the_end() -> None:
    sock = listening_socket()
    address = sock.getsockname()
    async with running(Seen().handler, listeners=[sock]) as server:
        assert server.addresses == [address]
        assert server.port == address[1]
        assert await served(await trio.open_tcp_stream(LOOPBACK, server.port))
    assert sock.fileno() == -1  # the service owned it


async def test_serves_on_given_trio_listeners_and_a_unix_socket(short_tmp: str) -> None:
    tcp = trio.SocketListener(trio.socket.from_stdlib_socket(listening_socket()))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(f"{short_tmp}/s")
    unix.listen()
    async with running(Seen().handler, listeners=(tcp, unix), proxy_protocol=True) as server:
        stream = await trio.open_tcp_stream(LOOPBACK, server.port)
        await stream.send_all(v1("192.0.2.1", 1))
        assert await served(stream)
        stream = await trio.open_unix_socket(f"{short_tmp}/s")
        await stream.send_all(v1("192.0.2.1", 1))
        assert await served(stream)
        await settled(server)
    assert not server.stats.errors


@pytest.mark.parametrize(
    ("where", "error", "message"),
    [
        ({"port": 0}, TypeError, "leave out port, host and path"),
        ({"host": LOOPBACK}, TypeError, "leave out"),
        ({"path": "/tmp/x"}, TypeError, "leave out"),
        ({"one": True}, TypeError, "a list of listeners"),
        ({"empty": True}, ValueError, "at least one"),
        ({"unbound": True}, ValueError, "not listening"),
        ({"udp": True}, ValueError, "SOCK_STREAM"),
        ({"junk": True}, TypeError, "neither"),
    ],
)
async def test_bad_listeners_are_refused_and_left_to_the_caller(
    where: dict[str, Any], error: type[Exception], message: str
) -> None:
    good = listening_socket()
    other = socket.socket(
        socket.AF_INET, socket.SOCK_DGRAM if "udp" in where else socket.SOCK_STREAM
    )
    try:
        given: Any = [good]
        if where.pop("one", False):
            given = good
        elif where.pop("empty", False):
            given = []
        elif where.pop("unbound", False) or where.pop("udp", False):
            given = [good, other]
        elif where.pop("junk", False):
            given = [good, "0.0.0.0:80"]
        with pytest.raises(error, match=message):
            await triocomm.serve(Seen().handler, codec=CODEC, listeners=given, **where)
        assert good.fileno() != -1  # still the caller's, still open
    finally:
        good.close()
        other.close()


SYSTEMD_CHILD = r"""
import os, socket, sys
from functools import partial
import trio, triocomm

def systemd_sockets():
    # sd_listen_fds(): the sockets start at fd 3, for this very process only.
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    return [socket.socket(fileno=3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]

async def main():
    stop = trio.Event()

    async def handler(request, conn):
        if request == b"stop":
            stop.set()
        return b"%d %s" % (os.getpid(), request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(
            triocomm.serve, handler, codec=triocomm.LengthPrefixed(), listeners=systemd_sockets()))
        print("ready", server.port, flush=True)
        await stop.wait()
        await server.shutdown()

trio.run(main)
"""


async def test_a_socket_inherited_the_systemd_way() -> None:
    """A child process gets the listening socket as fd 3 with LISTEN_FDS/LISTEN_PID, and serves."""
    sock = listening_socket()
    port = sock.getsockname()[1]
    fd = sock.fileno()
    # As systemd does: the socket becomes fd 3 of the exec'd service, whose pid
    # (the launcher's, kept across exec) is in LISTEN_PID.
    launcher = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[1]])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", launcher, SYSTEMD_CHILD],
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        env=env,
    )
    sock.close()  # only the child holds the socket now
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(100)
                assert chunk, "the child exited before serving"
                line += chunk
        assert line == b"ready %d\n" % port
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(frame(b"hello") + frame(b"stop"))
            replies = await read_replies(stream, 2)
        assert replies == [b"%d hello" % process.pid, b"%d stop" % process.pid]
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


# -- serve_workers -----------------------------------------------------------------


async def who_handler(request: bytes, conn: Connection[bytes, bytes]) -> bytes:
    """Module level, so that a worker process can unpickle it."""
    return repr((conn.remote_address, conn.proxied_by is not None)).encode()


async def test_serve_workers_passes_the_options_on() -> None:
    from triocomm._workers import serve_workers

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            group = await nursery.start(
                partial(
                    serve_workers,
                    who_handler,
                    0,
                    workers=1,
                    host=LOOPBACK,
                    codec=CODEC,
                    proxy_protocol=True,
                    deny=["192.0.2.0/24"],
                    grace=1.0,
                )
            )
            async with await trio.open_tcp_stream(LOOPBACK, group.port) as stream:
                await stream.send_all(v1("198.51.100.1", 7) + frame(b"x"))
                assert await read_reply(stream) == repr((("198.51.100.1", 7), True)).encode()
            async with await trio.open_tcp_stream(LOOPBACK, group.port) as stream:
                await send_quietly(stream, v1("192.0.2.1", 7) + frame(b"x"))
                assert await closed_by_server(stream)
            nursery.cancel_scope.cancel()


async def test_shutdown_lets_a_header_in_progress_finish_with_its_request() -> None:
    seen = Seen()
    header = v1("192.0.2.7", 51234)
    async with running(seen.handler, proxy_protocol=True) as server:
        done = trio.Event()

        async def stop() -> None:
            await server.shutdown(grace=None)
            done.set()

        async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
            await stream.send_all(header[:10])
            await trio.testing.wait_all_tasks_blocked()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()  # the connection is still the service's
                await stream.send_all(header[10:] + frame(b"last"))
                assert await read_reply(stream) == b"last"
                assert await closed_by_server(stream)
        assert done.is_set()
    assert seen.requests == [b"last"]
