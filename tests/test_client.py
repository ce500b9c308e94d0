"""The client: targets, request / connection / run, timeouts, connect errors, TLS, lifecycle.

Every server here is a scripted raw-Trio server (``test_client_peers``), so
the client is proven independently of triocomm's own server. Pool rules have
their own file, ``test_pool.py``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import ssl
from typing import Any

import pytest
import trio
import trio.testing
import trustme

import triocomm
from triocomm import (
    CommTimeout,
    ConnectError,
    ConnectionLost,
    ConnState,
    LengthPrefixed,
    Lines,
    ProtocolError,
    Target,
    Timeouts,
    open_client,
)

try:
    from .test_client_peers import Peer, echo, frame, open_fds, scripted_server
except ImportError:
    from test_client_peers import Peer, echo, frame, open_fds, scripted_server

CODEC = LengthPrefixed()
# No limits but the one a test is about (the defaults bound connect and inactivity).
NO_LIMITS = Timeouts(connect=None, inactivity=None, keepalive=None)


def ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Target ---------------------------------------------------------------------


def test_targets_are_immutable_hashable_and_compare_by_value() -> None:
    a = Target("127.0.0.1", 7000, LengthPrefixed())
    b = Target("127.0.0.1", 7000, LengthPrefixed())
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Target("127.0.0.1", 7001, LengthPrefixed())
    assert a != Target("127.0.0.1", 7000, Lines())
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1  # type: ignore[misc]


def test_target_addresses() -> None:
    assert str(Target("example.com", 80, CODEC)) == "example.com:80"
    v6 = Target("[::1]", 7000, CODEC)
    assert v6.host == "::1"
    assert str(v6) == "[::1]:7000"
    assert v6 == Target("::1", 7000, CODEC)
    unix = Target.unix("/run/app.sock", CODEC)
    assert unix.path == "/run/app.sock"
    assert unix.host is None
    assert str(unix) == "/run/app.sock"


def test_target_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="port"):
        Target("h", 0, CODEC)
    with pytest.raises(ValueError, match="port"):
        Target("h", 70000, CODEC)
    with pytest.raises(TypeError, match="host"):
        Target("", 1, CODEC)
    with pytest.raises(ValueError, match="max_connections"):
        Target("h", 1, CODEC, max_connections=0)
    with pytest.raises(TypeError, match="timeouts"):
        Target("h", 1, CODEC, timeouts=5)  # type: ignore[arg-type]
    # TLS over a Unix socket cannot guess the name to verify.
    with pytest.raises(ValueError, match="server_hostname"):
        Target.unix("/x.sock", CODEC, ssl_context=ssl.create_default_context())


def test_open_client_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="retries"):
        open_client(retries=-1)
    with pytest.raises(TypeError, match="timeouts"):
        open_client(timeouts=3)  # type: ignore[arg-type]


# -- the three session APIs -------------------------------------------------------


async def test_request_reply_and_connection_reuse() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        assert await client.request(target, b"one") == b"one"
        assert await client.request(target, b"two") == b"two"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.open) == (1, 1, 1)
        assert (stats.idle, stats.in_use) == (1, 0)
        assert server.accepted == 1


async def test_a_request_the_kernel_takes_in_part_is_sent_whole() -> None:
    # client.request hands the request to the socket at once; what the
    # kernel does not take is written as the peer reads. 12 MiB is more
    # than loopback's largest send and receive buffers together, and the
    # peer only starts reading after a pause, so the first write is partial.
    big = bytes(range(256)) * (48 * 1024)

    async def slow_echo(peer: Peer) -> None:
        await trio.sleep(0.1)
        await echo(peer)

    async with scripted_server(slow_echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        with trio.fail_after(20):
            assert await client.request(target, big) == big
            assert await client.request(target, b"after") == b"after"
        assert client.stats(target).reused == 1


async def test_equal_targets_share_one_pool() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        await client.request(Target("127.0.0.1", server.port, LengthPrefixed()), b"a")
        await client.request(Target("127.0.0.1", server.port, LengthPrefixed()), b"b")
        assert server.accepted == 1
        assert client.stats(Target("127.0.0.1", server.port, CODEC)).reused == 1


async def test_a_client_forgets_the_pools_of_targets_it_has_no_connection_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client that meets ever new targets (a crawler, a proxy) must not keep
    # a pool for each forever; a target it still has connections to keeps its
    # pool and counters.
    monkeypatch.setattr(triocomm._client, "_POOLS_KEPT", 8)
    once = Timeouts(keepalive=0)  # closed after each session: its pool empties

    def passing(i: int) -> Target[bytes, bytes]:
        return Target("127.0.0.1", server.port, CODEC, max_connections=i + 2, timeouts=once)

    async with scripted_server(echo) as server, open_client() as client:
        kept = Target("127.0.0.1", server.port, CODEC)
        assert await client.request(kept, b"kept") == b"kept"  # stays pooled, idle
        for i in range(100):
            assert await client.request(passing(i), b"%d" % i) == b"%d" % i
            assert len(client._pools) <= 8
        assert (client.stats(kept).created, client.stats(kept).idle) == (1, 1)
        assert await client.request(kept, b"again") == b"again"
        assert client.stats(kept).reused == 1
        assert client.stats(passing(0)).created == 0  # forgotten: counts from zero
        assert server.accepted == 101
        # A target used again right after its pool was dropped gets a pool
        # the client knows (and closes), not the forgotten one.
        again = passing(500)
        assert await client.request(again, b"x") == b"x"
        client._drop_unused_pools()
        assert await client.request(again, b"y") == b"y"
        assert client.stats(again).created == 1

        # Pools with connections are never dropped, and the next sweep waits
        # until the pools have doubled.
        sweeps = []
        sweep = client._drop_unused_pools

        def counted() -> None:
            sweeps.append(len(client._pools))
            sweep()

        monkeypatch.setattr(client, "_drop_unused_pools", counted)
        busy = [Target("127.0.0.1", server.port, CODEC, max_connections=i + 2) for i in range(40)]
        for i, target in enumerate(busy):
            assert await client.request(target, b"b%d" % i) == b"b%d" % i
        assert all(client.stats(t).idle == 1 for t in busy)
        assert client.stats(kept).idle == 1
        assert len(sweeps) <= 4  # at 8 (or fewer pools), then at least doubling
        assert client._sweep_at > 40


async def test_run_calls_the_session_function_with_the_connection() -> None:
    async def pipeline(conn: triocomm.Connection[bytes, bytes], n: int) -> list[bytes]:
        await conn.send_many([b"%d" % i for i in range(n)])
        return [await conn.receive() for _ in range(n)]

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        assert await client.run(target, pipeline, 3) == [b"0", b"1", b"2"]
        assert await client.run(target, pipeline, 2) == [b"0", b"1"]
        assert client.stats(target).reused == 1


async def test_connection_borrows_and_returns() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        async with client.connection(target) as conn:
            assert client.stats(target).in_use == 1
            await conn.send(b"x")
            assert await conn.receive() == b"x"
            first = conn.id
        assert client.stats(target).idle == 1
        async with client.connection(target) as conn:
            assert conn.id == first


async def test_an_error_in_run_closes_the_connection_and_reaches_the_caller_as_itself() -> None:
    async def fail(conn: triocomm.Connection[bytes, bytes]) -> None:
        await conn.send(b"x")
        raise KeyError("mine")

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        with pytest.raises(KeyError, match="mine"):
            await client.run(target, fail)
        with pytest.raises(ValueError, match="body"):
            async with client.connection(target):
                raise ValueError("body")
        stats = client.stats(target)
        assert (stats.created, stats.closed, stats.open, stats.failed) == (2, 2, 0, 2)


async def test_exceptions_leave_open_client_unwrapped() -> None:
    with pytest.raises(ConnectError):
        async with open_client() as client:
            await client.request(Target("127.0.0.1", unused_port(), CODEC), b"x")
    with pytest.raises(LookupError):
        async with open_client():
            raise LookupError


async def test_transports_ipv6_and_unix(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "c.sock")
    async with scripted_server(echo, path=path) as server, open_client() as client:
        target = Target.unix(path, CODEC)
        assert await client.request(target, b"unix") == b"unix"
        assert server.accepted == 1
    if not ipv6_works():
        pytest.skip("no IPv6 loopback")
    async with scripted_server(echo, host="::1") as server, open_client() as client:
        target = Target("::1", server.port, CODEC)
        assert await client.request(target, b"six") == b"six"
        async with client.connection(target) as conn:
            assert conn.remote_address[0] == "::1"  # type: ignore[index]


# -- seq and on_connect -----------------------------------------------------------


async def test_without_on_connect_the_first_session_has_seq_0() -> None:
    async def seq(conn: triocomm.Connection[bytes, bytes]) -> int:
        return conn.seq

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        assert [await client.run(target, seq) for _ in range(3)] == [0, 1, 2]


async def test_on_connect_runs_once_per_connection_first_with_seq_0() -> None:
    calls: list[tuple[int, int]] = []

    async def auth(conn: triocomm.Connection[bytes, bytes]) -> None:
        calls.append((conn.id, conn.seq))
        await conn.send(b"AUTH secret")
        assert await conn.receive() == b"+OK"

    async def server_script(peer: Peer) -> None:
        assert await peer.read_frame() == b"AUTH secret"  # always first
        await peer.send_frame(b"+OK")
        await echo(peer)

    async def seq(conn: triocomm.Connection[bytes, bytes]) -> tuple[int, int]:
        return conn.id, conn.seq

    async with scripted_server(server_script) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC, on_connect=auth)
        first = await client.run(target, seq)
        second = await client.run(target, seq)
        assert first[1] == 1
        assert second == (first[0], 2)
        # Two sessions at once need a second connection: its own handshake.
        async with client.connection(target) as a, client.connection(target) as b:
            assert {a.seq, b.seq} == {3, 1}
        assert calls == [(first[0], 0), (calls[1][0], 0)]
        assert calls[1][0] != first[0]
        assert client.stats(target).created == 2


async def test_a_failing_on_connect_fails_the_session_and_closes_the_connection() -> None:
    async def refuse(conn: triocomm.Connection[bytes, bytes]) -> None:
        raise PermissionError("no AUTH")

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC, on_connect=refuse)
        with pytest.raises(PermissionError, match="no AUTH"):
            await client.request(target, b"x")
        stats = client.stats(target)
        assert (stats.open, stats.connecting, stats.created, stats.failed) == (0, 0, 0, 1)
        with trio.fail_after(5):
            while server.closed < 1:
                await trio.sleep(0.01)


# -- connect failures -----------------------------------------------------------


async def test_refused_connect_is_a_connect_error_naming_the_address() -> None:
    port = unused_port()
    async with open_client() as client:
        target = Target("127.0.0.1", port, CODEC)
        with pytest.raises(ConnectError) as info:
            await client.request(target, b"x")
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "refused" in str(info.value).lower()  # the reason, not just "failed"
    assert info.value.address == f"127.0.0.1:{port}"
    assert isinstance(info.value.__cause__, OSError)
    assert isinstance(info.value, triocomm.CommError)


async def test_refused_connect_is_not_retried_and_counts_as_failed() -> None:
    async with open_client(retries=3) as client:
        target = Target("127.0.0.1", unused_port(), CODEC)
        with pytest.raises(ConnectError):
            await client.request(target, b"x")
        stats = client.stats(target)
        assert (stats.failed, stats.created, stats.connecting, stats.open) == (1, 0, 0, 0)


class _NoSuchHost(trio.abc.HostnameResolver):
    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: name or service not known")

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
        raise NotImplementedError


class _SlowResolver(trio.abc.HostnameResolver):
    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        await trio.sleep_forever()

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
        raise NotImplementedError


async def test_unresolvable_host_is_a_connect_error() -> None:
    trio.socket.set_custom_hostname_resolver(_NoSuchHost())
    try:
        async with open_client() as client:
            with pytest.raises(ConnectError, match=r"nowhere\.invalid:80") as info:
                await client.request(Target("nowhere.invalid", 80, CODEC), b"x")
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert isinstance(info.value.__cause__, OSError)


class _Unreachable(trio.abc.SocketFactory):
    """Real sockets whose connect fails as on a host with no route (no network used)."""

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0):  # type: ignore[no-untyped-def,override]
        sock = trio.socket.from_stdlib_socket(socket.socket(family, type, proto))

        async def connect(address: object) -> None:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

        sock.connect = connect  # type: ignore[method-assign]
        return sock


async def test_unreachable_address_is_a_connect_error_with_the_reason() -> None:
    trio.socket.set_custom_socket_factory(_Unreachable())
    try:
        async with open_client() as client:
            with pytest.raises(ConnectError) as info:
                await client.request(Target("192.0.2.1", 7000, CODEC), b"x")
    finally:
        trio.socket.set_custom_socket_factory(None)
    assert "192.0.2.1:7000" in str(info.value)
    assert os.strerror(errno.ENETUNREACH) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


async def test_missing_unix_socket_is_a_connect_error(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "absent.sock")
    async with open_client() as client:
        with pytest.raises(ConnectError, match=r"absent\.sock"):
            await client.request(Target.unix(path, CODEC), b"x")


async def test_connect_timeout_covers_name_resolution(
    autojump_clock: trio.testing.MockClock,
) -> None:
    trio.socket.set_custom_hostname_resolver(_SlowResolver())
    try:
        async with open_client(timeouts=Timeouts(connect=2.5)) as client:
            target = Target("slow.example", 80, CODEC)
            start = trio.current_time()
            with pytest.raises(CommTimeout) as info:
                await client.request(target, b"x")
            assert trio.current_time() - start == pytest.approx(2.5)
            assert client.stats(target).connecting == 0
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert info.value.phase == "connect"
    assert info.value.limit == 2.5
    assert "slow.example:80" in str(info.value)
    assert "2.5s" in str(info.value)


async def test_connect_timeout_covers_the_tls_handshake(client_ssl_context: ssl.SSLContext) -> None:
    async def silent(peer: Peer) -> None:
        await trio.sleep_forever()  # accepts, never answers the ClientHello

    # Plain listener: the server never runs TLS, so the handshake stalls.
    async with scripted_server(silent) as server, open_client() as client:
        target = Target(
            "127.0.0.1", server.port, CODEC, ssl_context=client_ssl_context,
            timeouts=Timeouts(connect=0.2),
        )  # fmt: skip
        with pytest.raises(CommTimeout) as info:
            await client.request(target, b"x")
        assert info.value.phase == "connect"
        assert f"127.0.0.1:{server.port}" in str(info.value)


# -- TLS ------------------------------------------------------------------------------


async def test_tls_request_and_reuse(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    async with scripted_server(echo, ssl_context=server_ssl_context) as server:
        async with open_client() as client:
            target = Target("localhost", server.port, CODEC, ssl_context=client_ssl_context)
            assert await client.request(target, b"secret") == b"secret"
            # Let the idle watcher run (it reads through the TLS layer, so a
            # session ticket arriving now is not mistaken for stray data).
            await trio.sleep(0.05)
            assert await client.request(target, b"again") == b"again"
            async with client.connection(target) as conn:
                assert conn.is_secure
            stats = client.stats(target)
            assert (stats.created, stats.reused, stats.closed) == (1, 2, 0)
        assert server.accepted == 1


async def test_tls_verifies_the_certificate_chain(server_ssl_context: ssl.SSLContext) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # trusts some other CA
    async with (
        scripted_server(echo, ssl_context=server_ssl_context) as server,
        open_client() as client,
    ):
        target = Target("localhost", server.port, CODEC, ssl_context=stranger)
        with pytest.raises(ConnectError, match="TLS handshake") as info:
            await client.request(target, b"x")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


async def test_tls_verifies_the_host_name(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    async with (
        scripted_server(echo, ssl_context=server_ssl_context) as server,
        open_client() as client,
    ):
        target = Target(
            "127.0.0.1", server.port, CODEC, ssl_context=client_ssl_context,
            server_hostname="wrong.example",
        )  # fmt: skip
        with pytest.raises(ConnectError) as info:
            await client.request(target, b"x")
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert "wrong.example" in str(info.value.__cause__)


# -- the Timeouts table: every row raises CommTimeout with its phase ----------------


async def _expect_timeout(
    script: object,
    timeouts: Timeouts,
    phase: str,
    message: bytes = b"x",
    codec: LengthPrefixed = CODEC,
) -> CommTimeout:
    async with scripted_server(script) as server, open_client() as client:  # type: ignore[arg-type]
        target = Target("127.0.0.1", server.port, codec, timeouts=timeouts)
        with pytest.raises(CommTimeout) as info:
            await client.request(target, message)
        assert info.value.phase == phase
        assert f"127.0.0.1:{server.port}" in str(info.value)
        stats = client.stats(target)
        assert (stats.open, stats.closed, stats.failed) == (0, 1, 1)
        return info.value


async def test_send_timeout_covers_writing_the_whole_request() -> None:
    async def never_reads(peer: Peer) -> None:
        await trio.sleep_forever()

    # Far more than loopback socket buffers hold, so the write must stall.
    big = LengthPrefixed(max_frame=64 * 1024 * 1024)
    exc = await _expect_timeout(
        never_reads, NO_LIMITS.replace(send=0.3), "send", b"x" * (40 * 1024 * 1024), big
    )
    assert exc.limit == 0.3
    assert "0.3s" in str(exc)


async def test_first_response_timeout_covers_the_wait_for_the_first_byte() -> None:
    async def slow(peer: Peer) -> None:
        await peer.read_frame()
        await trio.sleep(5)

    exc = await _expect_timeout(slow, NO_LIMITS.replace(first_response=0.2), "first_response")
    assert exc.limit == 0.2


async def test_a_session_timeout_names_the_target_as_written() -> None:
    async def slow(peer: Peer) -> None:
        await peer.read_frame()
        await trio.sleep(5)

    async with scripted_server(slow) as server, open_client() as client:
        target = Target("localhost", server.port, CODEC, timeouts=Timeouts(first_response=0.1))
        with pytest.raises(CommTimeout) as info:
            await client.request(target, b"x")
    message = str(info.value)
    assert f"localhost:{server.port}" in message  # the target
    assert "127.0.0.1" in message  # and the address it resolved to
    assert "0.1s" in message  # the limit


async def test_first_response_does_not_limit_a_reply_that_started() -> None:
    async def trickle(peer: Peer) -> None:
        await peer.read_frame()
        data = frame(b"slow reply")
        for i in range(len(data)):  # 14 bytes over ~0.7 s, first one at once
            await peer.send_raw(data[i : i + 1])
            await trio.sleep(0.05)
        await peer.wait_eof()

    async with scripted_server(trickle) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        reply = await client.request(
            target, b"x", timeouts=NO_LIMITS.replace(first_response=0.3, inactivity=0.3)
        )
        assert reply == b"slow reply"


async def test_receive_timeout_covers_the_whole_reply_despite_progress() -> None:
    async def trickle(peer: Peer) -> None:
        await peer.read_frame()
        data = frame(b"y" * 100)
        for i in range(len(data)):  # ~5 s for the whole reply, a byte per 0.05 s
            await peer.send_raw(data[i : i + 1])
            await trio.sleep(0.05)

    exc = await _expect_timeout(trickle, NO_LIMITS.replace(receive=0.4, inactivity=1.0), "receive")
    assert exc.limit == 0.4


async def test_inactivity_limits_each_read_not_the_whole_reply() -> None:
    async def stall_midway(peer: Peer) -> None:
        await peer.read_frame()
        data = frame(b"z" * 20)
        await peer.send_raw(data[:10])
        await trio.sleep(5)  # no progress
        await peer.send_raw(data[10:])

    exc = await _expect_timeout(stall_midway, NO_LIMITS.replace(inactivity=0.2), "inactivity")
    assert exc.limit == 0.2


async def test_inactivity_also_bounds_waiting_for_the_first_reply_byte() -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_frame()
        await trio.sleep(5)

    await _expect_timeout(silent, Timeouts(inactivity=0.2, first_response=None), "inactivity")


async def test_pool_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target(
            "127.0.0.1", server.port, CODEC, max_connections=1,
            timeouts=NO_LIMITS.replace(pool=3.0),
        )  # fmt: skip
        async with client.connection(target):
            start = trio.current_time()
            with pytest.raises(CommTimeout) as info:
                await client.request(target, b"x")
            assert trio.current_time() - start == pytest.approx(3.0)
        assert info.value.phase == "pool"
        assert f"127.0.0.1:{server.port}" in str(info.value)
        stats = client.stats(target)
        assert (stats.waiting, stats.failed, stats.idle) == (0, 1, 1)


async def test_keepalive_timeout_closes_an_idle_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC, timeouts=NO_LIMITS.replace(keepalive=30))
        await client.request(target, b"x")
        await trio.sleep(29)
        assert client.stats(target).idle == 1
        await trio.sleep(2)
        stats = client.stats(target)
        assert (stats.idle, stats.open, stats.closed) == (0, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert server.closed == 1  # the socket really is closed
        await client.request(target, b"y")
        assert client.stats(target).created == 2


async def test_keepalive_0_closes_after_each_session() -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC, timeouts=Timeouts(keepalive=0))
        assert await client.request(target, b"a") == b"a"
        assert await client.request(target, b"b") == b"b"
        stats = client.stats(target)
        assert (stats.created, stats.reused, stats.closed, stats.open) == (2, 0, 2, 0)


async def test_timeouts_precedence_call_over_target_over_client() -> None:
    async def slow(peer: Peer) -> None:
        while await peer.read_frame() is not None:
            await trio.sleep(0.3)
            await peer.send_frame(b"late")

    short = NO_LIMITS.replace(first_response=0.1)
    long = NO_LIMITS.replace(first_response=5.0)
    async with scripted_server(slow) as server:
        plain = Target("127.0.0.1", server.port, CODEC)
        with_own = Target("127.0.0.1", server.port, CODEC, timeouts=long)
        async with open_client(timeouts=short) as client:
            with pytest.raises(CommTimeout):  # the client's
                await client.request(plain, b"x")
            assert await client.request(with_own, b"x") == b"late"  # the target's wins
            with pytest.raises(CommTimeout):  # the call's wins over the target's
                await client.request(with_own, b"x", timeouts=short)
            assert await client.request(plain, b"x", timeouts=long) == b"late"
        # An override replaces the whole value: the defaults' inactivity=10
        # does not sneak back in under a call's Timeouts.
        assert client._effective_timeouts(plain, long) is long
        assert client._effective_timeouts(with_own, None) is long
        async with open_client() as bare:
            assert bare._effective_timeouts(plain, None) == Timeouts()


# -- messages the codec refuses ----------------------------------------------------


# LengthPrefixed(max_frame=4) speaks the scripted echo server's framing.
SMALL_FRAMES = LengthPrefixed(max_frame=4)
REFUSED = [
    pytest.param(SMALL_FRAMES, "text", TypeError, id="TypeError"),
    pytest.param(SMALL_FRAMES, b"12345", triocomm.FrameTooLarge, id="FrameTooLarge"),
    pytest.param(Lines(), b"two\nlines", ValueError, id="ValueError"),
]


@pytest.mark.parametrize(("codec", "message", "error"), REFUSED[:2])
async def test_a_refused_message_leaves_the_pooled_connection_alone(
    codec: triocomm.Codec[bytes, bytes], message: Any, error: type[Exception]
) -> None:
    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, codec)
        assert await client.request(target, b"one") == b"one"
        before = client.stats(target)
        with pytest.raises(error) as info:
            await client.request(target, message)
        assert type(info.value) is error  # the codec's own, not a CommError
        assert client.stats(target) == before  # nothing borrowed, opened or closed
        assert await client.request(target, b"two") == b"two"
        after = client.stats(target)
        assert (after.created, after.reused, after.closed, after.failed) == (1, 1, 0, 0)
        assert server.accepted == 1


@pytest.mark.parametrize(("codec", "message", "error"), REFUSED)
async def test_a_refused_message_to_a_server_that_is_down_raises_the_codec_error(
    codec: triocomm.Codec[bytes, bytes], message: Any, error: type[Exception]
) -> None:
    async with open_client() as client:
        target = Target("127.0.0.1", unused_port(), codec)
        with pytest.raises(error) as info:
            await client.request(target, message)
        assert type(info.value) is error
        assert client.stats(target) == triocomm.PoolStats()


# -- errors from the peer ---------------------------------------------------------


async def test_a_fresh_connection_closed_before_any_reply_byte_is_connection_lost() -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.read_frame()

    async with scripted_server(hang_up) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        with pytest.raises(ConnectionLost, match="before replying"):
            await client.request(target, b"x")
        assert server.accepted == 1  # a fresh connection is never retried


async def test_a_reply_cut_short_is_connection_lost() -> None:
    async def half(peer: Peer) -> None:
        await peer.read_frame()
        await peer.send_raw(frame(b"0123456789")[:7])

    async with scripted_server(half) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        with pytest.raises(ConnectionLost, match="middle of a message"):
            await client.request(target, b"x")


async def test_bad_input_is_a_protocol_error_and_the_connection_is_not_reused() -> None:
    async def oversized(peer: Peer) -> None:
        await peer.read_frame()
        await peer.send_raw(b"\xff\xff\xff\xff")
        await peer.wait_eof()

    async with scripted_server(oversized) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, LengthPrefixed(max_frame=1024))
        with pytest.raises(ProtocolError):
            await client.request(target, b"x")
        stats = client.stats(target)
        assert (stats.open, stats.closed) == (0, 1)


# -- lifecycle: nothing outlives open_client -------------------------------------------


def all_tasks() -> int:
    """Every task of this trio run."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_exiting_open_client_closes_every_socket_and_ends_every_task(
    server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    async with (
        scripted_server(echo) as plain_server,
        scripted_server(echo, ssl_context=server_ssl_context) as tls_server,
        scripted_server(Peer.wait_eof) as stalled,  # reads, never replies
    ):
        await trio.testing.wait_all_tasks_blocked()
        fds_before, tasks_before = open_fds(), all_tasks()
        plain = Target("127.0.0.1", plain_server.port, CODEC)
        tls = Target("localhost", tls_server.port, CODEC, ssl_context=client_ssl_context)
        errors: list[BaseException] = []

        async def stuck(client: triocomm.Client) -> None:
            try:
                await client.request(Target("127.0.0.1", stalled.port, CODEC), b"s")
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as outer, open_client() as client:
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(client.request, plain, b"p")
                    nursery.start_soon(client.request, tls, b"t")
            assert client.stats(plain).idle + client.stats(tls).idle == 6
            # A session in flight elsewhere when the block ends loses its
            # connection with it.
            outer.start_soon(stuck, client)
            await trio.testing.wait_all_tasks_blocked()
            assert all_tasks() > tasks_before
        assert len(errors) == 1
        with trio.fail_after(5):
            while plain_server.closed + tls_server.closed + stalled.closed < 7:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert open_fds() == fds_before
        assert all_tasks() == tasks_before
        assert plain_server.accepted == tls_server.accepted == 3


async def test_exiting_open_client_ends_settling_and_watching_connection_tasks() -> None:
    async with scripted_server(echo) as server:
        await trio.testing.wait_all_tasks_blocked()
        fds_before, tasks_before = open_fds(), all_tasks()
        target = Target("127.0.0.1", server.port, CODEC, timeouts=NO_LIMITS)
        async with open_client() as client:
            async with client.connection(target), client.connection(target):
                pass
            await trio.sleep(triocomm._pool._SETTLE * 1.5)  # both settle and are watched
            assert await client.request(target, b"x") == b"x"  # this one settles anew
            await trio.testing.wait_all_tasks_blocked()
            phases = sorted(entry.watching for entry in client._pools[target]._idle)
            assert phases == [False, True]
        with trio.fail_after(5):
            while server.closed < 2:
                await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert open_fds() == fds_before
        assert all_tasks() == tasks_before


async def test_the_client_refuses_sessions_after_it_closed() -> None:
    async with scripted_server(echo) as server:
        async with open_client() as client:
            pass
        with pytest.raises(trio.ClosedResourceError):
            await client.request(Target("127.0.0.1", server.port, CODEC), b"x")


async def test_connection_states_through_a_session() -> None:
    seen: list[ConnState] = []

    async def script(conn: triocomm.Connection[bytes, bytes]) -> None:
        seen.append(conn.state)
        await conn.send(b"x")
        await conn.receive()

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        await client.run(target, script)
        async with client.connection(target) as conn:
            seen.append(conn.state)
        assert conn.state is ConnState.IDLE
    assert seen == [ConnState.CONNECTED, ConnState.CONNECTED]
    assert conn.state in (ConnState.CLOSED, ConnState.ERROR)


def test_ssl_context_true_is_the_shared_verifying_default() -> None:
    codec = triocomm.LengthPrefixed()
    a = triocomm.Target("example.org", 443, codec, ssl_context=True)
    b = triocomm.Target("example.org", 443, codec, ssl_context=True)
    assert isinstance(a.ssl_context, ssl.SSLContext)
    assert a.ssl_context.verify_mode is ssl.CERT_REQUIRED
    assert a.ssl_context.check_hostname
    # One shared context: equal targets share one pool.
    assert a == b
    assert hash(a) == hash(b)
    assert triocomm.Target("example.org", 443, codec, ssl_context=False).ssl_context is None


async def test_run_passes_extra_arguments_through() -> None:
    # (Type checkers also check them against session_fn's signature.)
    async def session(conn: triocomm.Connection[bytes, bytes], a: int, b: str) -> str:
        return f"{a}{b}{conn.seq}"

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        target = triocomm.Target("127.0.0.1", port, triocomm.LengthPrefixed())
        async with triocomm.open_client() as client:
            assert await client.run(target, session, 4, "x") == "4x0"
        nursery.cancel_scope.cancel()


def test_a_unix_target_has_port_0_and_refuses_one() -> None:
    # Target.port is an int for every target (typed code needs no None check);
    # a Unix-socket target, which has no port, holds 0.
    target = Target.unix("/run/app.sock", CODEC)
    assert target.port == 0
    assert Target("127.0.0.1", 7000, CODEC).port == 7000
    with pytest.raises(TypeError, match="takes a path"):
        Target(None, 7000, CODEC, path="/run/app.sock")


async def test_a_session_that_left_its_connection_in_error_does_not_return_it_to_the_pool() -> None:
    # Good bytes, then a header over max_frame in the same read: the good
    # message is handed out with the connection already in ERROR, and the
    # socket holds nothing more, so only the state can keep it out of the pool.
    async def good_then_bad(peer: Peer) -> None:
        await peer.read_frame()
        await peer.stream.send_all(frame(b"ok") + frame(b"x" * 100)[:4])
        await trio.sleep_forever()

    async with scripted_server(good_then_bad) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, LengthPrefixed(max_frame=16))
        async with client.connection(target) as conn:
            await conn.send(b"hi")
            assert await conn.receive() == b"ok"
            assert conn.state is ConnState.ERROR
            first = conn.id
        assert client.stats(target).idle == 0
        async with client.connection(target) as conn:
            assert conn.id != first  # a new connection, not the failed one


async def test_a_connection_closed_by_its_session_is_not_given_back_to_the_pool() -> None:
    async def close_it(conn: triocomm.Connection[bytes, bytes]) -> int:
        await conn.send(b"x")
        assert await conn.receive() == b"x"
        await conn.aclose()  # nothing left unread: only its state says it is gone
        return conn.id

    async with scripted_server(echo) as server, open_client() as client:
        target = Target("127.0.0.1", server.port, CODEC)
        first = await client.run(target, close_it)
        stats = client.stats(target)
        assert (stats.idle, stats.open) == (0, 0)
        async with client.connection(target) as conn:
            assert conn.id != first
