"""serve_datagrams: one datagram in, one handler call, one reply datagram out.

Datagrams between one pair of loopback sockets arrive in order, and the
service reads one socket in order: a reply to a good datagram sent after a
bad one proves the bad one was read (and dropped and counted) before it.
Waits on the other side of the kernel (a flood being read) are bounded
polls of the service's counters, never a sleep standing in for an event.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import tracemalloc
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import triocomm
import triocomm._datagram_service
from triocomm.testing import open_fd_count, task_count


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = socket.has_ipv6 and _ipv6_loopback_works()
Handler = Callable[[Any, triocomm.DatagramPeer[Any]], Awaitable[Any]]


async def echo(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
    return request


@asynccontextmanager
async def datagram_service(
    handler: Handler = echo, host: str = "127.0.0.1", **options: Any
) -> AsyncIterator[triocomm.Server]:
    options.setdefault("codec", triocomm.Raw())
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(triocomm.serve_datagrams, handler, 0, host=host, **options)
        )
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def udp_client(server: triocomm.Server, host: str = "127.0.0.1") -> AsyncIterator[Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect((host, server.port))
        yield sock


async def receive(sock: Any) -> bytes:
    with trio.fail_after(10):
        data: bytes = await sock.recv(70000)
        return data


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for what the kernel delivers to the service to be counted."""
    for _ in range(1000):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("the service never got there")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_each_datagram_is_answered_by_one_datagram(host: str) -> None:
    if ":" in host and not IPV6:
        pytest.skip("no IPv6 loopback here")
    async with datagram_service(host=host) as server, udp_client(server, host) as sock:
        for size in (1, 100, 1400, 9000, 65507 if ":" not in host else 65000):
            await sock.send(bytes([size % 251]) * size)
            assert await receive(sock) == bytes([size % 251]) * size
        assert server.stats.sessions == 5
        assert server.stats.connections_open == server.stats.connections_total == 0
        assert sum(server.stats.errors.values()) == 0
        assert server.addresses == [sock.getpeername()]


async def test_the_handler_sees_the_peer_and_may_send_more_or_no_reply() -> None:
    seen: list[tuple[Any, Any]] = []

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes | None:
        seen.append((peer.remote_address, peer.local_address))
        assert "DatagramPeer" in repr(peer)
        if request == b"quiet":
            return None
        for part in (b"one", b"two"):
            await peer.send(part)
        return b"done"

    async with datagram_service(handler) as server, udp_client(server) as sock:
        await sock.send(b"quiet")
        await sock.send(b"go")
        assert [await receive(sock) for _ in range(3)] == [b"one", b"two", b"done"]
        assert seen == [(sock.getsockname(), server.addresses[0])] * 2
        assert server.stats.sessions == 2


async def test_a_reply_or_send_must_fit_in_max_datagram(caplog: pytest.LogCaptureFixture) -> None:
    refused: list[Exception] = []

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        try:
            await peer.send(b"x" * 33)
        except ValueError as exc:
            refused.append(exc)
        return request * 2

    async with datagram_service(handler, max_datagram=32) as server, udp_client(server) as sock:
        await sock.send(b"a" * 20)  # the reply, 40 bytes, does not fit
        await sock.send(b"b" * 16)
        assert await receive(sock) == b"b" * 32
        assert server.stats.errors == {"handler": 1}
    assert len(refused) == 2
    assert "at most 32" in str(refused[0])
    assert "the handler raised" in caplog.text


@pytest.mark.parametrize(
    ("codec", "bad", "why"),
    [
        (triocomm.Raw(), b"x" * 65, "larger than max_datagram=64"),  # oversized
        (triocomm.Raw(), b"", "held 0"),  # empty: no message
        (triocomm.LengthPrefixed("!H"), b"\x00\x09abc", "an unfinished one"),  # truncated
        (triocomm.LengthPrefixed("!H"), b"\x00\x01a\x00\x01b", "held 2"),  # two messages
        (triocomm.LengthPrefixed("!H", max_frame=8), b"\x00\x20" + b"z" * 32, "max_frame is 8"),
        (triocomm.Lines(), b"no end of line", "an unfinished one"),  # garbage for the codec
        (triocomm.Raw(max_chunk=8), b"0123456789", "held 2"),
    ],
)
async def test_bad_datagrams_are_dropped_and_counted(
    codec: Any, bad: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = codec.encode(b"ok")
    async with (
        datagram_service(codec=codec, max_datagram=64) as server,
        udp_client(server) as sock,
    ):
        for _ in range(3):
            await sock.send(bad)
            await sock.send(good)
            assert await receive(sock) == good
        assert server.stats.errors == {"protocol": 3}
        assert server.stats.sessions == 3
        sender = f"127.0.0.1:{sock.getsockname()[1]}"
    # Logged once (the same kind within a second is only counted).
    dropped = [r for r in caplog.records if "dropped a datagram" in r.getMessage()]
    assert len(dropped) == 1
    assert why in dropped[0].getMessage()
    assert sender in dropped[0].getMessage()


async def test_the_log_names_how_many_drops_it_left_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with datagram_service() as server, udp_client(server) as sock:
        for _ in range(3):
            await sock.send(b"")
        await eventually(lambda: server.stats.errors["protocol"] == 3)
        await trio.sleep(1.5)
        await sock.send(b"")
        await eventually(lambda: server.stats.errors["protocol"] == 4)
    dropped = [r.getMessage() for r in caplog.records if "dropped a datagram" in r.getMessage()]
    assert len(dropped) == 2
    assert "(2 more since the last report)" in dropped[1]


async def test_a_raising_handler_fails_that_datagram_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        if request.startswith(b"raise"):
            raise RuntimeError(f"handler failed on {request!r}")
        if request == b"wrong type":
            return "text"  # type: ignore[return-value]  # the codec refuses it
        return request

    async with datagram_service(handler) as server, udp_client(server) as sock:
        for i in range(5):
            await sock.send(b"raise %d" % i)
            await sock.send(b"wrong type")
            await sock.send(b"fine %d" % i)
            assert await receive(sock) == b"fine %d" % i
        assert server.stats.errors == {"handler": 10}
        assert server.stats.sessions == 15
    # Logged once (handlers run concurrently: either of the first two).
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "the handler raised" in message
    assert "handler failed on b'raise 0'" in message or "Raw.encode() takes bytes" in message
    assert errors[0].exc_info is not None


async def test_a_flood_beyond_max_in_flight_is_dropped_with_memory_flat() -> None:
    release = trio.Event()
    running = 0
    most = 0

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return request

    before = task_count()
    async with datagram_service(handler, max_in_flight=8) as server, udp_client(server) as sock:
        service_tasks = task_count() - before
        sent = 0
        tracemalloc.start()
        try:
            for flood in range(5):
                if flood == 1:
                    held = tracemalloc.get_traced_memory()[0]
                for _ in range(200):
                    await sock.send(b"flood")
                    sent += 1
                stats = server.stats
                await eventually(lambda s=stats, n=sent: s.sessions + s.errors["overload"] == n)
                # Nothing queued: eight handler tasks, whatever the flood.
                assert stats.sessions == 8
                assert task_count() - before == service_tasks + 8
            # 800 datagrams dropped since, for a few hundred bytes (a log line or two).
            assert tracemalloc.get_traced_memory()[0] - held < 16 * 1024
        finally:
            tracemalloc.stop()
        assert most == 8
        release.set()
        replies = [await receive(sock) for _ in range(8)]
        assert replies == [b"flood"] * 8
        assert server.stats.errors == {"overload": sent - 8}
        # Once the flood is over, the service answers again.
        await sock.send(b"after")
        assert await receive(sock) == b"after"


async def test_workers_are_reused_and_bounded_when_idle() -> None:
    release = trio.Event()

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        if request == b"wait":
            await release.wait()
        return request

    before = task_count()
    async with datagram_service(handler) as server, udp_client(server) as sock:
        service_tasks = task_count() - before
        for _ in range(200):
            await sock.send(b"wait")
        await eventually(lambda: server.stats.sessions == 200)
        assert task_count() - before == service_tasks + 200
        release.set()
        for _ in range(200):
            await receive(sock)
        await trio.testing.wait_all_tasks_blocked()
        # 64 idle workers are kept for the next burst; the rest ended.
        assert task_count() - before == service_tasks + 64
        for i in range(50):
            await sock.send(b"%d" % i)
            assert await receive(sock) == b"%d" % i
        assert task_count() - before == service_tasks + 64


async def test_shutdown_stops_receiving_and_lets_running_handlers_reply() -> None:
    started = trio.Event()
    release = trio.Event()

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        started.set()
        await release.wait()
        return b"late " + request

    async with (
        trio.open_nursery() as nursery,
        datagram_service(handler) as server,
        udp_client(server) as sock,
    ):
        await sock.send(b"first")
        await started.wait()
        nursery.start_soon(server.shutdown, None)
        await trio.testing.wait_all_tasks_blocked()
        assert server.shutting_down
        await sock.send(b"second")  # not read any more
        release.set()
        assert await receive(sock) == b"late first"
    assert server.stats.sessions == 1


async def test_shutdown_cancels_what_the_grace_period_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cancelled = []

    async def handler(request: bytes, peer: triocomm.DatagramPeer[bytes]) -> bytes:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.append(trio.current_time())
        return request  # pragma: no cover

    async with datagram_service(handler) as server, udp_client(server) as sock:
        await sock.send(b"stuck")
        await eventually(lambda: server.stats.sessions == 1)
        start = trio.current_time()
        await server.shutdown(grace=2.0)
        assert cancelled == [start + 2.0]
        with pytest.raises(ValueError, match="grace"):
            await server.shutdown(grace=-1)


async def test_nothing_outlives_the_service() -> None:
    fds, tasks = open_fd_count(), task_count()
    for shutdown in (True, False):
        async with datagram_service(host="localhost") as server, udp_client(server) as sock:
            for _ in range(20):
                await sock.send(b"x")
                await receive(sock)
            if shutdown:
                await server.shutdown()
    assert task_count() == tasks
    assert open_fd_count() == fds


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback here")
async def test_every_interface_one_port() -> None:
    async with datagram_service(host=None) as server:  # type: ignore[arg-type]
        families = {len(address) for address in server.addresses}
        assert families == {2, 4}  # an IPv4 and an IPv6 socket
        assert {address[1] for address in server.addresses} == {server.port}
        for host in ("127.0.0.1", "::1"):
            async with udp_client(server, host) as sock:
                await sock.send(host.encode())
                assert await receive(sock) == host.encode()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_datagram": 0}, ValueError),
        ({"max_datagram": 70000}, ValueError),
        ({"max_datagram": 1.5}, TypeError),
        ({"max_in_flight": 0}, ValueError),
        ({"max_in_flight": True}, TypeError),
    ],
)
async def test_bad_options_fail_before_binding(options: dict[str, Any], error: type) -> None:
    fds = open_fd_count()
    with pytest.raises(error):
        await triocomm.serve_datagrams(echo, 0, codec=triocomm.Raw(), **options)
    with pytest.raises(ValueError, match="port"):
        await triocomm.serve_datagrams(echo, -1, codec=triocomm.Raw())
    with pytest.raises(TypeError, match="handler"):
        await triocomm.serve_datagrams(None, 0, codec=triocomm.Raw())  # type: ignore[arg-type]
    assert open_fd_count() == fds


async def test_a_port_in_use_raises_oserror() -> None:
    async with datagram_service() as server:
        with pytest.raises(OSError):
            await triocomm.serve_datagrams(
                echo, server.port, host="127.0.0.1", codec=triocomm.Raw()
            )


async def test_a_family_the_system_lacks_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_ipv6(family: int = -1, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    # Only the service's own module sees the system without IPv6.
    lacking = types.ModuleType("socket")
    lacking.__dict__.update(vars(socket))
    lacking.socket = no_ipv6  # type: ignore[attr-defined]
    monkeypatch.setattr(triocomm._datagram_service, "socket", lacking)
    async with datagram_service(host=None) as server:  # type: ignore[arg-type]
        assert [len(address) for address in server.addresses] == [2]
        async with udp_client(server) as sock:
            await sock.send(b"v4")
            assert await receive(sock) == b"v4"
    with pytest.raises(OSError, match="no address family"):
        await triocomm.serve_datagrams(echo, 0, host="::1", codec=triocomm.Raw())
