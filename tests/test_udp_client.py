"""Target.udp: client.request over datagrams, against serve_datagrams and raw sockets.

One exchange is one attempt: a reply that does not come is a
``first_response`` timeout (timed with the autojump clock), and the socket
it was sent on is closed, so its late reply cannot reach a later request.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
from triocomm.testing import open_fd_count


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = socket.has_ipv6 and _ipv6_loopback_works()


async def echo(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
    return request


@asynccontextmanager
async def service(
    handler: Any = echo, host: str = "127.0.0.1", codec: Any = None
) -> AsyncIterator[triocomm.Server]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                triocomm.serve_datagrams, handler, 0, host=host, codec=codec or triocomm.Raw()
            )
        )
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_peer() -> AsyncIterator[Any]:
    """A bare UDP socket standing in for a server that misbehaves."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_request_gets_the_reply_and_reuses_the_socket(host: str) -> None:
    if host == "::1" and not IPV6:
        pytest.skip("no IPv6 loopback here")
    # "localhost" binds every address the name has, so the client finds one.
    async with service(host=host) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp(host, server.port, triocomm.Raw())
        for i in range(5):
            assert await client.request(target, b"ping %d" % i) == b"ping %d" % i
        stats = client.stats(target)
        assert (stats.open, stats.idle, stats.in_use) == (1, 1, 0)
        assert (stats.created, stats.reused, stats.closed, stats.failed) == (1, 4, 0, 0)
        assert server.stats.sessions == 5


async def test_concurrent_exchanges_use_their_own_sockets_and_few_are_kept() -> None:
    release = trio.Event()
    waiting = 0

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        nonlocal waiting
        waiting += 1
        if waiting == 12:
            release.set()
        await release.wait()
        return request

    replies: dict[int, bytes] = {}

    async def one(client: triocomm.Client, target: Any, i: int) -> None:
        replies[i] = await client.request(target, b"%d" % i)

    async with service(handler) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, client, target, i)
        assert replies == {i: b"%d" % i for i in range(12)}
        stats = client.stats(target)
        assert (stats.created, stats.idle, stats.closed) == (12, 8, 4)


async def test_a_lost_reply_is_a_first_response_timeout_and_closes_the_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> None:
        return None

    async with service(silent) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
        start = trio.current_time()
        with pytest.raises(triocomm.CommTimeout) as caught:
            await client.request(target, b"anyone?")
        assert caught.value.phase == "first_response"
        assert caught.value.limit == 1.0  # the UDP default
        assert trio.current_time() - start == pytest.approx(1.0)
        short = triocomm.Timeouts(first_response=0.25)
        with pytest.raises(triocomm.CommTimeout) as caught:
            await client.request(target, b"anyone?", timeouts=short)
        assert caught.value.limit == 0.25
        stats = client.stats(target)
        assert (stats.open, stats.created, stats.closed, stats.failed) == (0, 2, 2, 2)


async def test_a_late_reply_never_answers_a_later_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def slow_first(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        if request == b"first":
            await trio.sleep(1.5)
        return request

    async with service(slow_first) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
        with pytest.raises(triocomm.CommTimeout):
            await client.request(target, b"first")
        for i in range(3):
            await trio.sleep(1)  # the late reply goes out meanwhile
            assert await client.request(target, b"next %d" % i) == b"next %d" % i


async def test_stray_datagrams_are_drained_before_a_socket_is_reused() -> None:
    async def twice(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> None:
        await peer.send(request)
        await peer.send(b"duplicate of " + request)

    async with service(twice) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
        for i in range(3):
            assert await client.request(target, b"%d" % i) == b"%d" % i
            # Wait until the duplicate sits on the cached socket.
            assert client._udp is not None
            (cached,) = client._udp._targets[target].idle
            await trio.lowlevel.wait_readable(cached)
        assert client.stats(target).reused == 2


async def test_what_does_not_fit_in_a_datagram_raises_valueerror() -> None:
    async with service() as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw(), max_datagram=100)
        with pytest.raises(ValueError, match="101 bytes; a datagram holds at most 100"):
            await client.request(target, b"x" * 101)
        with pytest.raises(TypeError):
            await client.request(target, "text")
        assert client.stats(target) == triocomm.PoolStats()
        assert await client.request(target, b"x" * 100) == b"x" * 100


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (b"\x00\x01a\x00\x01b", "held 2"),
        (b"\x00\x05ab", "an unfinished one"),
        (b"\x00\x30" + b"z" * 48, "larger than max_datagram=32"),
    ],
)
async def test_a_reply_that_is_not_one_message_raises_protocolerror(reply: bytes, why: str) -> None:
    async with raw_peer() as peer, triocomm.open_client() as client:
        port = peer.getsockname()[1]
        target = triocomm.Target.udp(
            "127.0.0.1", port, triocomm.LengthPrefixed("!H"), max_datagram=32
        )
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                _, sender = await peer.recvfrom(100)
                await peer.sendto(reply, sender)

            nursery.start_soon(answer)
            with pytest.raises(triocomm.ProtocolError, match=why):
                await client.request(target, b"q")
        stats = client.stats(target)
        assert (stats.open, stats.closed, stats.failed) == (0, 1, 1)


async def test_nobody_listening_is_a_connect_error() -> None:
    async with raw_peer() as peer:
        port = peer.getsockname()[1]
    async with triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", port, triocomm.Raw())
        with pytest.raises(triocomm.ConnectError, match="refused"):
            await client.request(target, b"hello?")


async def test_max_connections_bounds_the_sockets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    async def held(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        await release.wait()
        return request

    async with service(held) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp(
            "127.0.0.1",
            server.port,
            triocomm.Raw(),
            max_connections=1,
            timeouts=triocomm.Timeouts(first_response=10, pool=2),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.request, target, b"first")
            await trio.testing.wait_all_tasks_blocked()
            assert client.stats(target).in_use == 1
            with pytest.raises(triocomm.CommTimeout) as caught:
                await client.request(target, b"second")
            assert caught.value.phase == "pool"
            release.set()
        assert client.stats(target).failed == 1


async def test_a_cancelled_exchange_closes_its_socket() -> None:
    async def silent(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> None:
        return None

    async with service(silent) as server, triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
        with trio.move_on_after(0.05):
            await client.request(target, b"x")
        stats = client.stats(target)
        assert (stats.open, stats.closed, stats.failed) == (0, 1, 1)


async def test_udp_targets_take_only_request() -> None:
    async with triocomm.open_client() as client:
        target = triocomm.Target.udp("127.0.0.1", 5353, triocomm.Raw())

        async def session(conn: Any) -> None:
            pass  # pragma: no cover

        with pytest.raises(TypeError, match="UDP target"):
            await client.run(target, session)
        with pytest.raises(TypeError, match="UDP target"):
            async with client.connection(target):
                pass  # pragma: no cover
        with pytest.raises(TypeError, match="Upstream"):
            await client.request(triocomm.Upstream([target]), b"x")


def test_target_udp_checks_its_options() -> None:
    target = triocomm.Target.udp("[::1]", 53, triocomm.Raw())
    assert (target.host, target.max_datagram, str(target)) == ("::1", 65507, "[::1]:53")
    assert target == triocomm.Target.udp("::1", 53, triocomm.Raw())
    assert target != triocomm.Target("::1", 53, triocomm.Raw())
    with pytest.raises(ValueError, match="max_datagram"):
        triocomm.Target.udp("127.0.0.1", 53, triocomm.Raw(), max_datagram=0)
    with pytest.raises(TypeError, match="TLS"):
        triocomm.Target("h", 53, triocomm.Raw(), max_datagram=512, ssl_context=True)
    with pytest.raises(TypeError, match="on_connect"):
        triocomm.Target("h", 53, triocomm.Raw(), max_datagram=512, on_connect=print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        triocomm.Target.udp("h", 0, triocomm.Raw())


async def test_nothing_outlives_the_client() -> None:
    fds = open_fd_count()
    async with service() as server:
        async with triocomm.open_client() as client:
            target = triocomm.Target.udp("127.0.0.1", server.port, triocomm.Raw())
            for _ in range(3):
                await client.request(target, b"x")
            assert client.stats(target).idle == 1
        assert client.stats(target).closed == 1
        with pytest.raises(trio.ClosedResourceError):
            await client.request(target, b"x")
    assert open_fd_count() == fds


class _NoNames(trio.abc.HostnameResolver):
    """A resolver that knows no name (the tests never ask a real DNS server)."""

    async def getaddrinfo(self, host: Any, port: Any, *args: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        raise NotImplementedError  # pragma: no cover


async def test_an_unresolvable_name_is_a_connect_error() -> None:
    previous = trio.socket.set_custom_hostname_resolver(_NoNames())
    try:
        async with triocomm.open_client() as client:
            target = triocomm.Target.udp("no-such-host.test", 53, triocomm.Raw())
            with pytest.raises(
                triocomm.ConnectError, match=r"cannot resolve no-such-host\.test:53"
            ):
                await client.request(target, b"")
            assert client.stats(target).failed == 1
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
